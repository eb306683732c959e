"""What a run shows in TensorBoard: its tag names, the HPARAMS experiment, and the custom-scalars layout.

Tag names are chosen for the order TensorBoard's Time Series page sorts groups in (by the text before the
first ``/``; the first two groups open expanded): ``accuracy/`` and ``loss/`` come first, then the counters
(``progress/``), the per-tensor RSO statistics (``rso/``), the curves against forward samples (``samples/``),
the final evaluation (``summary/``) and the weight histograms (``weights/``).

Every optimizer logs the same keys, with steps in scalar weight updates (an RSO visit is one, an SGD step
updates every weight) and, under ``samples/``, in forward-pass samples, so RSO and SGD share every chart.
Every run writes the same HPARAMS experiment (all options, the shared metrics), whichever one TensorBoard reads
first, and its own session lists only the options that apply to its optimizer and model.
"""

from __future__ import annotations

TEST_ACCURACY = "accuracy/test"
TEST_LOSS = "loss/test"
TRAIN_LOSS = "loss/train"
ACCEPTED = "progress/accepted"
DONE_FRACTION = "progress/done_fraction"
FORWARD_SAMPLES = "progress/forward_samples"
SECONDS = "progress/seconds"
WEIGHT_UPDATES = "progress/weight_updates"
FINAL_ACCURACY = "summary/test_accuracy"
FINAL_LOSS = "summary/test_loss"
BY_SAMPLES = {TEST_ACCURACY: "samples/test_accuracy", TEST_LOSS: "samples/test_loss", TRAIN_LOSS: "samples/train_loss"}


def accept_rate_tag(tensor: str) -> str:
    return f"rso/accept_rate/{tensor}"


def sigma_tag(tensor: str) -> str:
    return f"rso/sigma/{tensor}"


def weights_tag(tensor: str) -> str:
    return f"weights/{tensor}"


# The HPARAMS metrics: one set for every optimizer (TensorBoard shows each run's last value of each tag).
METRICS = {FINAL_ACCURACY: "final test accuracy", FINAL_LOSS: "final test loss", TEST_ACCURACY: "test accuracy",
           TRAIN_LOSS: "train loss", DONE_FRACTION: "fraction of the budget done",
           WEIGHT_UPDATES: "weight updates", FORWARD_SAMPLES: "forward samples", SECONDS: "training seconds"}

# Every option a session may carry: (config key, type, which optimizers it applies to). The first five with
# ``shown`` are the columns HPARAMS shows by default (it shows five, those marked "differs" first).
_ALL, _RSO, _BACKPROP = ("rso", "sgd", "adam"), ("rso",), ("sgd", "adam")
HPARAMS = [
    # key, type, applies to, shown by default
    ("optimizer", str, _ALL, True), ("model", str, _ALL, True), ("batch_size", int, _ALL, True),
    ("cycles", int, _RSO, True), ("epochs", int, _BACKPROP, True),
    ("lr", float, _BACKPROP, False), ("momentum", float, ("sgd",), False),
    ("anneal", bool, _RSO, False), ("final_sigma_fraction", float, _RSO, False), ("bn_sigma", float, _RSO, False),
    ("weight_decay", float, _RSO, False), ("sampler", str, _RSO, False), ("order", str, _RSO, False),
    ("chunking", str, _RSO, False), ("engine", str, _RSO, False), ("suffix_precision", str, _RSO, False),
    ("depth", int, _ALL, False), ("channels", int, _ALL, False), ("widths", str, _ALL, False),
    ("train_subset", int, _ALL, False), ("dtype", str, _ALL, False), ("seed", int, _ALL, False),
]
_MODEL_OPTIONS = {"depth": ("convnet",), "channels": ("convnet",), "widths": ("mlp",)}


def session_hparams(config: dict, has_batchnorm: bool) -> dict:
    """The options that apply to this run (its optimizer, its model), as TensorBoard hparam values."""
    optimizer, chosen = config["optimizer"], {}
    for key, kind, applies_to, _ in HPARAMS:
        value = config.get(key)
        if optimizer not in applies_to or value is None:
            continue
        if key in _MODEL_OPTIONS and config["model"] not in _MODEL_OPTIONS[key]:
            continue
        if (key == "bn_sigma" and not has_batchnorm) or (key == "final_sigma_fraction" and not config.get("anneal")):
            continue
        chosen[key] = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else kind(value)
    return chosen


def _hparams_summary(tag: str, **data):
    """A summary the HPARAMS plugin reads: ``data`` is one field of its ``HParamsPluginData``."""
    from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
    from tensorboard.plugins.hparams import metadata, plugin_data_pb2

    content = plugin_data_pb2.HParamsPluginData(version=metadata.PLUGIN_DATA_VERSION, **data)
    plugin = SummaryMetadata.PluginData(plugin_name=metadata.PLUGIN_NAME, content=content.SerializeToString())
    return Summary(value=[Summary.Value(tag=tag, metadata=SummaryMetadata(plugin_data=plugin))])


def hparams_summaries(config: dict, has_batchnorm: bool) -> list:
    """The experiment (the same for every run) and this run's session-start summaries."""
    import time

    from google.protobuf import struct_pb2
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

    types = {str: api_pb2.DATA_TYPE_STRING, bool: api_pb2.DATA_TYPE_BOOL, int: api_pb2.DATA_TYPE_FLOAT64,
             float: api_pb2.DATA_TYPE_FLOAT64}
    infos = []
    for key, kind, _, shown in HPARAMS:
        info = api_pb2.HParamInfo(name=key, type=types[kind], differs=shown)
        if kind is bool:
            info.domain_discrete.values.extend([struct_pb2.Value(bool_value=False), struct_pb2.Value(bool_value=True)])
        infos.append(info)
    metrics = [api_pb2.MetricInfo(name=api_pb2.MetricName(tag=tag), display_name=name) for tag, name in METRICS.items()]
    experiment = api_pb2.Experiment(hparam_infos=infos, metric_infos=metrics)
    start = plugin_data_pb2.SessionStartInfo(start_time_secs=time.time())
    for key, value in session_hparams(config, has_batchnorm).items():
        if isinstance(value, bool):
            start.hparams[key].bool_value = value
        elif isinstance(value, str):
            start.hparams[key].string_value = value
        else:
            start.hparams[key].number_value = value
    return [_hparams_summary(metadata.EXPERIMENT_TAG, experiment=experiment),
            _hparams_summary(metadata.SESSION_START_INFO_TAG, session_start_info=start)]


def session_end_summary():
    import time

    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

    end = plugin_data_pb2.SessionEndInfo(status=api_pb2.STATUS_SUCCESS, end_time_secs=time.time())
    return _hparams_summary(metadata.SESSION_END_INFO_TAG, session_end_info=end)


def custom_scalars_layout() -> dict:
    """One chart per metric holding every run (RSO and SGD side by side), against weight updates and against
    forward samples (``SummaryWriter.add_custom_scalars`` format)."""
    names = {TEST_ACCURACY: "test accuracy", TEST_LOSS: "test loss", TRAIN_LOSS: "train loss"}
    return {
        "RSO and backprop against weight updates": {
            name: ["Multiline", [f"^{tag}$"]] for tag, name in names.items()},
        "RSO and backprop against forward samples": {
            name: ["Multiline", [f"^{BY_SAMPLES[tag]}$"]] for tag, name in names.items()},
    }
