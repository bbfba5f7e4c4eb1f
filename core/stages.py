"""Names shared by every layer: the stages an artifact records and the tensor groups it holds.

Each stage's report folder inside an artifact carries the stage's name (`probe/`, `calibrate/`, ...).
"""

PROBE = "probe"
PROFILE = "profile"
CALIBRATE = "calibrate"
PRUNE = "prune"
STEER = "steer"
AUDIT = "audit"

# Tensor groups (`<group>.safetensors`): tuned lens and exit classifier, pruning masks, steering directions.
EXITS_GROUP = "exits"
MASKS_GROUP = "masks"
STEERING_GROUP = "steering"
