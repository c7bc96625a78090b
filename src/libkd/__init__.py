"""libkd: data-efficient ViTs distilled from an ensemble of convolution and involution teachers."""

__version__ = "0.1.0"


class LibkdError(Exception):
    """An error caused by the user's input (path, config, data, checkpoint, store).

    Its message names the problem and the fix; the CLI prints it without a traceback.
    """


# Importing libkd registers its models (kdvit_*, rednet*) in timm's registry, so that
# timm.create_model("local-dir:EXPORT_DIR", pretrained=True) rebuilds an exported student.
from libkd import models as _models  # noqa: E402,F401
