"""Names and bounds shared by the library and the command line (light: no imports, so `--help`
and the option checks read them without loading JAX)."""

MODEL_CHOICES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
SEED_MAX = 2**31 - 1          # numpy and jax.random both take it
IMAGE_SIZE_MIN, IMAGE_SIZE_MAX = 8, 1024  # below 8 the stem leaves no map; above 1024 one image costs > 12 MB
PRECISIONS = ("fp32", "bf16")  # compute dtypes of extract, gradcam and train (core.precision)
AUDIT_DEFAULT_METHODS = ("margin", "loss", "aum", "tracin")  # audit's default methods; the first ranks
INFLUENCES = ("relatif", "cosine", "raw", "fisher")  # explain's influence kinds; the first is the default
STAGES = ("stem", "layer1", "layer2", "layer3", "layer4")  # the ResNet stages: Grad-CAM layers, parameter subsets
EXPLAIN_REMOVALS = ("retrain", "mask")  # how `bench explain` removes images; the first is the default
