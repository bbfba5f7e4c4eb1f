"""Names shared by every layer: the stages an artifact records and the tensor groups it holds.

Each stage's report folder inside an artifact carries the stage's name (`probe/`, `calibrate/`, ...).
"""

PROBE = "probe"
PROFILE = "profile"
CALIBRATE = "calibrate"
PRUNE = "prune"
STEER = "steer"
TUNE = "tune"  # tune-exits: a LoRA that teaches the exits, baked in before every other change
AUDIT = "audit"
STOP = "stop"  # certified stop rules (one per workload: completion, reasoning)
# Where the tuned lens in the exits group was trained (which corpus windows), so that a later stage
# can tell whether it trained on text that stage evaluates on.
LENS = "lens"

# Tensor groups (`<group>.safetensors`): tuned lens and exit classifier, pruning masks, steering directions,
# the tune-exits LoRA.
EXITS_GROUP = "exits"
MASKS_GROUP = "masks"
STEERING_GROUP = "steering"
TUNING_GROUP = "tuning"
# The calibration prompts and the full model's continuations of them (generation risk), reused by later runs.
GENERATION_GROUP = "generation"
