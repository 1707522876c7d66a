import os

# moshi compiles some functions on first call otherwise (~14 s each on CPU); set before moshi is imported.
os.environ.setdefault("NO_TORCH_COMPILE", "1")
