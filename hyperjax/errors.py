"""Named exceptions: every failure a user can cause surfaces as one of these, with what and where."""


class HyperjaxError(Exception):
    """Base class of every error hyperjax raises on purpose."""


class GGUFError(HyperjaxError):
    """A GGUF file cannot be read: wrong magic, truncated, or internally inconsistent."""


class UnsupportedTensorTypeError(GGUFError):
    """A tensor uses a GGML type hyperjax does not import losslessly."""


class UnsupportedArchitectureError(GGUFError):
    """The file's `general.architecture` is not one hyperjax can run."""


class QuantizationError(HyperjaxError):
    """A tensor's shape or values do not fit the requested block format."""


class TokenizerError(HyperjaxError):
    """The tokenizer metadata is missing or cannot be turned into a tokenizer."""


class ModelNotFoundError(HyperjaxError):
    """A model name or path does not resolve to a file."""


class ModelFetchError(HyperjaxError):
    """Fetching a registered model failed (network, checksum, archive member)."""


class InvalidPromptError(HyperjaxError, ValueError):
    """A prompt is empty, too long for the context, or not valid text."""


class SamplingConfigError(HyperjaxError, ValueError):
    """A sampling option is out of its range."""


class PatchingError(HyperjaxError, ValueError):
    """Patching options are out of range (threshold, mode, minimum/maximum patch length, window)."""


class TrainConfigError(HyperjaxError, ValueError):
    """A training option or config file is invalid (unknown key, out-of-range value, unreadable TOML)."""


class DataError(HyperjaxError):
    """Training data is missing, empty, of the wrong dtype or shape, or too short for the context length."""


class CheckpointError(HyperjaxError):
    """A checkpoint directory is unreadable, truncated, or does not match the run that wants to resume from it."""


class ConfigError(HyperjaxError, ValueError):
    """A configuration file, variable or setting is unknown, of the wrong type or out of range."""
