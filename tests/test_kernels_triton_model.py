"""The Triton backend inside a pruned model: decoding through `SparseMLP(backend="triton")` under
Triton's interpreter equals the masked-dense model (subprocess: TRITON_INTERPRET is read at import)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")
pytestmark = pytest.mark.triton

SCRIPT = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, sys.argv[1])
    from tiny_models import tiny_model
    from dyninfer.core.layered import LayeredModel
    from dyninfer.compressors.pruning import pruned
    from dyninfer.compressors.pruning_calibration import calibrate_threshold_plan, collect_mlp_samples, train_predictors

    for arch in ("llama", "gpt2"):
        lm = LayeredModel(tiny_model(arch).requires_grad_(False))
        samples = collect_mlp_samples(lm, torch.randint(2, 100, (4, 33), generator=torch.Generator().manual_seed(0)))
        plans = [calibrate_threshold_plan(lm, samples, 0.5), train_predictors(lm, samples, 0.5, rank=8, steps=10)[0]]
        for plan in plans:
            tokens = samples.inputs[1][:4]
            with torch.no_grad():
                with pruned(lm, plan, "masked"):
                    expected = lm.mlp(1)(tokens[:, None])
                with pruned(lm, plan, "triton"):
                    got = torch.cat([lm.mlp(1)(t.view(1, 1, -1)) for t in tokens])
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
            print(arch, plan.method, "ok")
""")


def test_triton_backend_decodes_like_the_masked_model():
    tests_dir = os.path.dirname(__file__)
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, tests_dir], capture_output=True, text=True, timeout=600, env={**os.environ, "TRITON_INTERPRET": "1"}
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("ok") == 4
