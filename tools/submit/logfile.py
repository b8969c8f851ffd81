"""Parse the log that train_gpt.py writes into a Run: its source block, settings, curves and final scores."""

import hashlib
import math
import os
import re

# Hyperparameters that may differ between the seeds of one submission: the
# seed, the run's name and the folder the artifact is written to. Everything
# else, DATA_PATH and TOKENIZER_PATH included, must be equal: those decide
# what the model was trained and scored on.
VARYING_HPARAMS = ("SEED", "RUN_ID", "ARTIFACT_DIR")
# Parts of the `env` line that are part of the configuration.
ENV_CONFIG_KEYS = ("world_size", "device_name")

FINAL_KEYS = ("val_loss", "val_bpb", "bytes_total", "bytes_model", "bytes_code",
              "train_time_ms", "eval_time_ms")
BYTES_KEYS = ("bytes_model", "bytes_code", "bytes_total")


_NUM = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def num(value):
    """'1234ms' -> 1234.0, '3.5' -> 3.5, 'nan' -> nan; None when no number."""
    if value is None:
        return None
    low = value.strip().lower()
    if low in ("nan", "+nan", "-nan"):
        return float("nan")
    if low in ("inf", "+inf", "infinity"):
        return math.inf
    if low in ("-inf", "-infinity"):
        return -math.inf
    m = _NUM.match(low)
    return float(m.group(0)) if m else None


def int_or_none(value):
    x = num(value)
    return int(x) if x is not None and math.isfinite(x) else None


def kv(tokens):
    out = {}
    for tok in tokens:
        key, sep, val = tok.partition(":")
        if sep and key:
            out[key] = val
    return out


# One-shot log events and the Run attribute that keeps their key:value fields (None
# while the log has no such line).
EVENT_FIELDS = {"stopping_early": "stopping_early", "train_done": "train_done", "pre_export_exact": "pre_export",
                "artifact": "artifact", "final_roundtrip_exact": "roundtrip", "final_sliding_exact": "sliding",
                "final_ttt_exact": "ttt", "compliance": "compliance", "final_submission": "final",
                "val_data": "val_data"}


class Run:
    """Everything one log says about one run."""

    def __init__(self, path):
        self.path = path
        self.status = "truncated"   # complete | truncated | crashed | malformed
        self.problem = ""           # why it is not complete
        self.notes = []
        self.code = None            # bytes of the source block
        self.code_bytes_declared = None
        self.code_sha_declared = None
        self.env = {}
        self.hparams = {}
        self.model = {}
        self.train_points = []      # (step, train_loss, train_time_ms)
        self.val_points = []        # (step, val_loss, val_bpb, train_time_ms)
        self.total_steps = None
        self.last_step = None
        self.step_avg_ms = None
        for attr in EVENT_FIELDS.values():
            setattr(self, attr, None)
        self.exact_lines = []       # (event, fields) of every *_exact line, in order
        self.final_exact = None     # (event, fields) of the last final_*_exact line before final_submission
        self.error = None
        self.last_event = None      # what the log ends with, for a run that stops early
        self.lines_after_final = 0
        self.checks = {}            # name -> (True/False/None, detail)
        self.counted = False

    # -- derived values ---------------------------------------------------
    @property
    def run_id(self):
        rid = self.hparams.get("RUN_ID")
        return rid if rid else os.path.splitext(os.path.basename(self.path))[0]

    @property
    def seed(self):
        return int_or_none(self.hparams.get("SEED"))

    @property
    def code_sha(self):
        return hashlib.sha256(self.code).hexdigest() if self.code is not None else None

    @property
    def steps(self):
        if self.train_done and "step" in self.train_done:
            return int_or_none(self.train_done["step"].split("/")[0])
        return self.last_step

    def field(self, section, key, conv=num):
        """`key` of the one-shot event line kept in attribute `section`, through `conv`; None where it is absent."""
        sec = getattr(self, section)
        return conv(sec.get(key)) if sec and key in sec else None

    def _first_field(self, *places, conv=num):
        """The first (section, key) of `places` that the log has."""
        return next((v for v in (self.field(s, k, conv) for s, k in places) if v is not None), None)

    @property
    def train_time_ms(self):
        return self._first_field(("final", "train_time_ms"), ("train_done", "train_time"))

    @property
    def eval_time_ms(self):
        v = self.field("final", "eval_time_ms")
        if v is None:
            parts = [self.field(s, "eval_time_ms") for s in ("roundtrip", "sliding", "ttt")]
            parts = [p for p in parts if p is not None]
            v = max(parts) if parts else None  # each line's eval_time_ms counts from the start of the final eval
        return v

    def bytes_field(self, key):
        return self._first_field(("final", key), ("artifact", key), conv=int_or_none)

    @property
    def val_loss(self):
        return self.field("final", "val_loss")

    @property
    def val_bpb(self):
        return self.field("final", "val_bpb")

    @property
    def complete(self):
        return self.status == "complete"

    def config(self):
        cfg = {k: v for k, v in self.hparams.items() if k not in VARYING_HPARAMS}
        for k in ENV_CONFIG_KEYS:
            if k in self.env:
                cfg["env." + k] = self.env[k]
        return cfg


def _is_final_exact(event):
    # Matched by pattern: each new evaluation train_gpt.py adds gets a name of this form.
    return event.startswith("final_") and event.endswith("_exact")


def parse_log(path) -> Run:
    run = Run(path)
    with open(path, "rb") as f:
        data = f.read()
    rest = _read_source_block(run, data)
    if rest is not None and _read_events(run, rest.decode("utf-8", "replace")):
        _settle_status(run)
    return run


def _read_source_block(run, data):
    """The bytes after the code_begin line, the source block and code_end; None (with run.problem said) where the
    log ends before them or they are malformed."""
    nl = data.find(b"\n")
    header = (data if nl < 0 else data[:nl]).decode("utf-8", "replace")
    htoks = header.split()
    if not htoks or htoks[0] != "code_begin":
        if not data:
            run.problem = "empty log"
        else:
            run.status = "malformed"
            run.problem = "does not start with 'code_begin' (not a train_gpt.py log?)"
        return None
    hdr = kv(htoks[1:])
    n = int_or_none(hdr.get("bytes"))
    run.code_bytes_declared = n
    run.code_sha_declared = hdr.get("sha256")
    if nl < 0:
        run.problem = "log ends inside the code_begin line"
        return None
    if n is None or n < 0:
        run.status = "malformed"
        run.problem = "code_begin line has no valid bytes:N"
        return None
    start = nl + 1
    if len(data) < start + n:
        run.problem = "log ends inside the source block (%d of %d bytes)" % (len(data) - start, n)
        return None
    run.code = data[start:start + n]
    rest = data[start + n:]
    if rest.startswith(b"code_end"):
        return rest[len(b"code_end"):]
    if rest.startswith(b"\ncode_end"):
        return rest[len(b"\ncode_end"):]
    if rest.strip() == b"":
        run.problem = "log ends after the source block, before code_end"
    else:
        run.status = "malformed"
        run.problem = "source block not followed by code_end (byte count wrong?)"
    return None


def _read_events(run, text):
    """Every line after code_end into `run`; False (the run malformed) where a second run's log begins."""
    run.last_event = "code_end"
    for raw in text.split("\n"):
        line = raw.strip()
        if not line:
            continue
        if run.final is not None:
            run.lines_after_final += 1
        if line.startswith("error:"):
            run.error = line[len("error:"):].strip() or "(no message)"
            run.last_event = "error"
            continue
        toks = line.split()
        if toks[0] == "code_begin":
            run.status = "malformed"
            run.problem = "a second code_begin: more than one run in this log (RUN_ID reused?)"
            return False
        if ":" in toks[0]:
            event, fields = None, kv(toks)
        else:
            event, fields = toks[0], kv(toks[1:])
        if event is None and "step" in fields:
            _read_step(run, fields)
            continue
        if event is None:
            continue
        run.last_event = event
        if event == "env":
            run.env.update(fields)
        elif event == "hparam":
            run.hparams.update(fields)
        elif event == "model":
            run.model.update(fields)
        if event.endswith("_exact"):
            run.exact_lines.append((event, fields))
        if event in EVENT_FIELDS:
            setattr(run, EVENT_FIELDS[event], fields)
            if event == "final_submission":
                run.lines_after_final = 0
                run.final_exact = next(((e, f) for e, f in reversed(run.exact_lines) if _is_final_exact(e)), None)
    return True


def _read_step(run, fields):
    s, _, tot = fields["step"].partition("/")
    step = int_or_none(s)
    if tot:
        run.total_steps = int_or_none(tot)
    if step is None:
        return
    run.last_step = step
    ms = num(fields.get("train_time"))
    if "step_avg" in fields:
        run.step_avg_ms = num(fields["step_avg"])
    if "train_loss" in fields:
        run.train_points.append((step, num(fields["train_loss"]), ms))
    if "val_loss" in fields or "val_bpb" in fields:
        run.val_points.append((step, num(fields.get("val_loss")), num(fields.get("val_bpb")), ms))
    run.last_event = "step:%s" % fields["step"]


def _settle_status(run):
    """The run's status and problem from all it logged: complete, crashed, malformed or (still) truncated."""
    if run.error is not None:
        run.status = "crashed"
        run.problem = "error: " + run.error
    elif run.final is None:
        where = run.last_event if run.last_event.startswith("step:") else "'%s'" % run.last_event
        if run.last_step is not None and not run.last_event.startswith("step:"):
            where += " (last step %d)" % run.last_step
        run.problem = "no final_submission line; log ends after %s" % where
    else:
        missing = [k for k in FINAL_KEYS if k not in run.final]
        if missing:
            run.status = "malformed"
            run.problem = "final_submission lacks " + ", ".join(missing)
        else:
            run.status = "complete"
            if run.lines_after_final:
                run.notes.append("%d line(s) after final_submission" % run.lines_after_final)
            if not all(math.isfinite(x) for x in (run.val_loss, run.val_bpb)):
                run.status = "crashed"
                run.problem = "score is not finite (val_loss %s)" % run.final["val_loss"]
    if run.status == "crashed" and run.final is not None and run.error is not None:
        run.notes.append("has final_submission but also an error line")
