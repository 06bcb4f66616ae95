"""Any Hugging Face causal language model as an activation source (the ``hf`` source).

    src = activation_source("hf", model="path/to/saved_model", hook="blocks.1.hook_resid_pre",
                            dataset="path/to/texts/", context_len=64)

``model`` is a Hub name (``"gpt2"``, ``"EleutherAI/pythia-70m"``), a local directory written by
``save_pretrained`` (config, weights and tokenizer), or a loaded ``transformers`` model object
(then pass ``tokenizer=`` too). It is wrapped with TransformerLens's
``TransformerBridge.boot_transformers``, so hook names are TransformerLens's
(``blocks.L.hook_resid_pre``, ``blocks.L.hook_mlp_out``, ...) whatever the architecture, and
activations are the Hugging Face model's own (no weight folding).

``dataset`` is a Hub dataset name (streamed; ``dataset_config`` picks a configuration) or local
data: a text file, a folder of them (``.txt``/``.md``: one document per paragraph by default,
see ``sample_by``; ``.jsonl``/``.json``/``.csv``/``.parquet``: one document per row, text in
``text_field``), or a folder written by ``Dataset.save_to_disk``.

Documents are shuffled (seeded, in a buffer of ``shuffle_buffer_docs``), tokenised, joined with
the beginning-of-sequence token (the tokenizer's BOS, else its EOS: GPT-2's ``<|endoftext|>``)
and cut into windows of ``context_len`` tokens that each start with it (SAELens's convention;
the store's ``exclude_first`` drops that position). A document is held out (``held_out``,
``eval_contexts``) when the hash of its text falls below ``held_out_fraction``; training never
sees it.

Offline, nothing waits on the network: a Hub name is resolved from the local Hugging Face cache
when ``HF_HUB_OFFLINE`` is set or the Hub does not answer an HTTPS request within
``PROBE_TIMEOUT`` seconds (a connection that opens and then fails TLS counts as no answer), and
when it is not cached the source fails at once with one ``SourceUnavailable`` that says what is
missing and what to use instead.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import ssl
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ..config import ConfigError
from .store import ActivationStore, StoreConfig

OFFLINE_HINT = (
    "Offline, pass a local model directory (save_pretrained) and local text files to "
    "activation_source('hf', ...), or use activation_source('tiny') (a byte-level model the "
    "suite trains on the standard library's docstrings) or activation_source('synthetic') "
    "(ground-truth features)."
)
PROBE_TIMEOUT = 1.5
"""Seconds the Hub gets to answer one HTTPS request before the source treats it as offline."""
TEXT_SUFFIXES = {".txt": "text", ".md": "text", ".text": "text"}
TABLE_SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
_TRUTHY = {"1", "true", "yes", "on"}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


class SourceUnavailable(RuntimeError):
    """An activation source cannot run here; the message says what is missing and the fix."""


# ----- where things are ------------------------------------------------------------------------
def offline_env() -> list[str]:
    """The Hugging Face offline variables that are set to a true value."""
    names = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
    return [n for n in names if os.environ.get(n, "").strip().lower() in _TRUTHY]


def hub_endpoint() -> str:
    """The Hub's address: ``$HF_ENDPOINT`` (read now, not at import), else huggingface.co."""
    return os.environ.get("HF_ENDPOINT", "").strip().rstrip("/") or "https://huggingface.co"


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache, from the environment as it is now."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HUGGINGFACE_HUB_CACHE"):
        return Path(os.environ["HUGGINGFACE_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "huggingface" / "hub"


def hub_unreachable_reason(timeout: float = PROBE_TIMEOUT) -> str | None:
    """None when the Hub answers an HTTPS request within `timeout` seconds (any HTTP status
    counts), else why not. Name resolution included: the request runs in a thread that is
    abandoned when it is late, so this returns within about `timeout` seconds."""
    url = hub_endpoint() + "/api/models?limit=1"
    result: list[str | None] = []

    def probe() -> None:
        ctx = None
        if url.startswith("https"):
            try:
                import certifi  # the certificates the Hugging Face clients use

                ctx = ssl.create_default_context(cafile=certifi.where())
            except ImportError:
                ctx = ssl.create_default_context()
        try:
            req = urllib.request.Request(url, method="HEAD")
            with urllib.request.urlopen(req, timeout=timeout, context=ctx):
                result.append(None)
        except urllib.error.HTTPError:
            result.append(None)  # it answered
        except (OSError, ValueError, ssl.SSLError) as e:
            reason = getattr(e, "reason", e)
            result.append(f"{type(reason).__name__}: {reason}")

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 0.5)
    return result[0] if result else f"no answer within {timeout:g} s"


def hub_reachable(timeout: float = PROBE_TIMEOUT) -> bool:
    """Whether the Hub answers an HTTPS request within `timeout` seconds."""
    return hub_unreachable_reason(timeout) is None


def _has_weights(directory: Path) -> bool:
    return any(p.suffix in _WEIGHT_SUFFIXES for p in directory.iterdir() if p.is_file())


def cached_snapshot(repo_id: str, revision: str | None = None) -> Path | None:
    """The local snapshot folder of a Hub model when its config and weights are cached."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        return None
    try:
        path = Path(
            snapshot_download(
                repo_id, revision=revision, cache_dir=hub_cache_dir(), local_files_only=True
            )
        )
    except Exception:  # not cached, or not a valid repository name
        return None
    return path if (path / "config.json").is_file() and _has_weights(path) else None


def _looks_like_path(name: str) -> bool:
    return (
        name.startswith((".", "/", "~"))
        or name.endswith("/")
        or name.count("/") > 1
        or "\\" in name
    )


def in_held_out(text: str, fraction: float = 0.01) -> bool:
    """True for the documents held out of training (by the sha256 of their text)."""
    h = int.from_bytes(hashlib.sha256(text.encode("utf-8", "replace")).digest()[:8], "big")
    return h / 2**64 < fraction


def check_available(
    model: str = "gpt2",
    dataset: str = "Skylion007/openwebtext",
    *,
    revision: str | None = None,
    source: str = "hf",
) -> str:
    """Where to load `model` from (its name, a local directory or a cached snapshot), after
    checking quickly, without downloading, that the model and the dataset can be had. Raises
    SourceUnavailable when they cannot, ConfigError for a local path that is not there."""
    model, dataset = str(model), str(dataset)
    local_model = Path(model).expanduser()
    if local_model.is_dir():
        if not (local_model / "config.json").is_file():
            raise ConfigError(
                f"model directory {model!r} has no config.json; pass a folder written by "
                f"save_pretrained (config.json, weights and tokenizer files)."
            )
        model_where: str | None = str(local_model)
    elif local_model.exists() or _looks_like_path(model):
        raise ConfigError(
            f"model {model!r} is not a directory; pass a folder written by save_pretrained or "
            f"a Hugging Face Hub name such as 'gpt2'."
        )
    else:
        model_where = None
    local_data = Path(dataset).expanduser().exists()
    suffix = Path(dataset).suffix.lower()
    if not local_data and (
        _looks_like_path(dataset) or suffix in {**TEXT_SUFFIXES, **TABLE_SUFFIXES}
    ):
        raise ConfigError(
            f"dataset {dataset!r} does not exist; pass a text file, a folder of .txt/.jsonl/"
            f".csv/.parquet files, or a Hugging Face Hub dataset name."
        )
    missing: list[str] = []
    if importlib.util.find_spec("datasets") is None:
        missing.append(
            "the Hugging Face `datasets` package is not installed (pip install datasets)"
        )
    snapshot = cached_snapshot(model, revision) if model_where is None else None
    needs_hub = (model_where is None) or not local_data
    offline = offline_env()
    if needs_hub and offline:
        flag = "/".join(f"{n}=1" for n in offline)
        if model_where is None and snapshot is None:
            missing.append(
                f"model {model!r} is neither a local directory nor in the local Hugging Face "
                f"cache, and {flag} forbids downloading it"
            )
        if not local_data:
            missing.append(
                f"dataset {dataset!r} is streamed from the Hub, which {flag} forbids (pass "
                f"local text files or a folder instead)"
            )
        model_where = model_where or (str(snapshot) if snapshot else None)
    elif needs_hub:
        why = hub_unreachable_reason()
        if why is None:
            model_where = model_where or model
        else:
            host = hub_endpoint()
            what = [] if model_where or snapshot else [f"model {model!r} (not in the local cache)"]
            what += [] if local_data else [f"dataset {dataset!r} (streamed)"]
            if what:
                missing.append(
                    f"no network: {host} did not answer ({why}), so {' and '.join(what)} "
                    f"cannot be loaded"
                )
            model_where = model_where or (str(snapshot) if snapshot else None)
    if missing:
        raise SourceUnavailable(
            f"the {source} activation source cannot run here: {'; '.join(missing)}. {OFFLINE_HINT}"
        )
    assert model_where is not None
    return model_where


def _dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype), None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ConfigError(f"dtype={dtype!r} is not a floating torch dtype; e.g. 'float32'.")
    return value


def _file_fingerprint(paths: list[Path], content: bool) -> str:
    """sha256 over names and sizes (and contents when `content`) of files."""
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(f"{p.name}\0{p.stat().st_size}\0".encode())
        if content:
            with open(p, "rb") as f:
                for block in iter(lambda f=f: f.read(1 << 22), b""):
                    h.update(block)
    return h.hexdigest()


def local_data_files(dataset: str) -> tuple[str, list[str]]:
    """(datasets builder, files) of a local dataset path; ('disk', [dir]) for save_to_disk."""
    path = Path(dataset).expanduser()
    if path.is_dir() and any((path / f).is_file() for f in ("dataset_info.json", "state.json")):
        return "disk", [str(path)]
    suffixes = {**TEXT_SUFFIXES, **TABLE_SUFFIXES}
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    files = [p for p in files if p.suffix.lower() in suffixes and not p.name.startswith(".")]
    if not files:
        raise ConfigError(
            f"dataset {dataset!r} holds no file ending in {sorted(suffixes)}; pass text files "
            f"or a folder of them."
        )
    builders = {suffixes[p.suffix.lower()] for p in files}
    if len(builders) > 1:
        raise ConfigError(
            f"dataset {dataset!r} mixes file kinds {sorted(builders)}; keep one kind per folder."
        )
    return builders.pop(), [str(p) for p in files]


# ----- the source --------------------------------------------------------------------------------
class HFSource:
    """Activations at a hook of a Hugging Face causal LM on text (the ``hf`` source).

    ``batches`` streams shuffled training vectors through an ActivationStore (store.py: buffer,
    filters, optional disk cache); ``held_out(n)`` gives vectors of held-out documents, filtered
    alike; ``eval_contexts(n)`` the held-out token windows for evaluations that run the model
    (lm_eval.py); ``model`` is the TransformerBridge, ``tokenizer`` its tokenizer.
    """

    source_name = "hf"

    def __init__(
        self,
        model: Any,
        hook: str | None = None,
        dataset: str | None = None,
        *,
        context_len: int = 128,
        seed: int = 0,
        tokenizer: Any = None,
        revision: str | None = None,
        dataset_config: str | None = None,
        dataset_split: str = "train",
        text_field: str = "text",
        sample_by: str = "paragraph",
        device: str | None = None,
        dtype: str | torch.dtype = "float32",
        harvest_contexts: int = 32,
        shuffle_buffer_docs: int = 10_000,
        held_out_fraction: float = 0.01,
        buffer_tokens: int = 262_144,
        exclude_first: bool = True,
        outlier_multiple: float | None = 10.0,
        cache: bool = False,
        cache_tokens: int = 10_000_000,
        cache_dir: str | None = None,
        trust_remote_code: bool = False,
    ) -> None:
        if dataset is None:
            raise ConfigError(
                "dataset is missing: pass a Hugging Face Hub dataset name or local text files."
            )
        if int(context_len) < 2:
            raise ConfigError(f"context_len={context_len} must be >= 2.")
        if not 0.0 < float(held_out_fraction) < 1.0:
            raise ConfigError(f"held_out_fraction={held_out_fraction} must be in (0, 1).")
        if sample_by not in ("paragraph", "document", "line"):
            raise ConfigError(
                f"sample_by={sample_by!r} is not known; choose 'paragraph', 'document' or 'line'."
            )
        self.dataset, self.dataset_config = str(dataset), dataset_config
        self.dataset_split, self.text_field, self.sample_by = dataset_split, text_field, sample_by
        self.context_len, self.seed = int(context_len), int(seed)
        self.harvest_contexts = int(harvest_contexts)
        self.shuffle_buffer_docs = int(shuffle_buffer_docs)
        self.held_out_fraction = float(held_out_fraction)
        self.revision = revision
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.local_data = Path(self.dataset).expanduser().exists()
        self.data_files = local_data_files(self.dataset) if self.local_data else None
        self.model = self._boot(model, tokenizer, _dtype(dtype), trust_remote_code)
        from .tiny import check_hook

        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        n_layers = int(self.model.cfg.n_layers)
        self.hook = hook or f"blocks.{n_layers // 2}.hook_resid_pre"
        check_hook(self.model, self.hook)
        n_ctx = getattr(self.model.cfg, "n_ctx", None)
        if n_ctx and self.context_len > int(n_ctx):
            raise ConfigError(
                f"context_len={self.context_len} exceeds the model's context of {n_ctx} tokens; "
                f"pass context_len <= {n_ctx}."
            )
        self.tokenizer = self.model.tokenizer
        if self.tokenizer is None:
            raise ConfigError(f"model {self.model_id!r} came without a tokenizer; pass tokenizer=.")
        bos = self.tokenizer.bos_token_id
        bos = self.tokenizer.eos_token_id if bos is None else bos
        if bos is None:
            raise ConfigError(
                f"the tokenizer of {self.model_id!r} has neither a BOS nor an EOS token to start "
                f"windows with; set tokenizer.bos_token before passing it."
            )
        self.bos = int(bos)
        self.d_in = int(self.model.cfg.d_model)
        self._ident = self._identity(content_hash=cache)
        store_cfg = StoreConfig(
            buffer_tokens=buffer_tokens,
            exclude_first=exclude_first,
            outlier_multiple=outlier_multiple,
            cache=cache,
            cache_tokens=cache_tokens,
            cache_dir=cache_dir,
        )
        self.store = ActivationStore(
            self.harvest,
            self._contexts,
            self.d_in,
            store_cfg,
            seed=self.seed,
            provenance=self._ident,
        )

    def _boot(self, model: Any, tokenizer: Any, dtype: torch.dtype, trust_remote_code: bool):
        kwargs: dict[str, Any] = {"device": self.device, "dtype": dtype}
        if trust_remote_code:
            kwargs["trust_remote_code"] = True
        if tokenizer is not None:
            kwargs["tokenizer"] = tokenizer
        if not isinstance(model, (str, os.PathLike)):  # a loaded transformers model
            name = str(getattr(getattr(model, "config", None), "_name_or_path", "") or "")
            self.model_id, self.model_dir = name or type(model).__name__, None
            if tokenizer is None:
                if not (name and Path(name).is_dir()):
                    raise ConfigError(
                        "a model object needs its tokenizer: pass tokenizer= (e.g. "
                        "AutoTokenizer.from_pretrained of the same model)."
                    )
                from transformers import AutoTokenizer

                kwargs["tokenizer"] = AutoTokenizer.from_pretrained(name)
            if not self.local_data:
                self._check_data()
            loader_name = name or "external"
            kwargs["hf_model"] = model.to(self.device)
        else:
            self.model_id = str(model)
            where = check_available(
                self.model_id, self.dataset, revision=self.revision, source=self.source_name
            )
            self.model_dir = Path(where) if Path(where).is_dir() else None
            loader_name = where
            if self.revision is not None and self.model_dir is None:
                kwargs["revision"] = self.revision
        # imported only now: the availability checks above answer before this slow import
        from transformer_lens.model_bridge import TransformerBridge

        try:
            return TransformerBridge.boot_transformers(loader_name, **kwargs)
        except Exception as e:  # a loader error of any kind: say what failed and what to do
            raise SourceUnavailable(
                f"the {self.source_name} activation source could not load model "
                f"{self.model_id!r} ({type(e).__name__}: {e}). {OFFLINE_HINT}"
            ) from e

    def _check_data(self) -> None:
        if offline_env() or not hub_reachable():
            raise SourceUnavailable(
                f"the {self.source_name} activation source cannot stream dataset "
                f"{self.dataset!r}: the Hub cannot be reached. {OFFLINE_HINT}"
            )

    def _identity(self, content_hash: bool = False) -> dict[str, Any]:
        ident: dict[str, Any] = {
            "source": self.source_name,
            "model": self.model_id,
            "revision": self.revision,
            "hook": self.hook,
            "dataset": self.dataset,
            "dataset_config": self.dataset_config,
            "dataset_split": self.dataset_split,
            "text_field": self.text_field,
            "context_len": self.context_len,
            "seed": self.seed,
            "held_out_fraction": self.held_out_fraction,
        }
        if self.model_dir is not None:  # the files, so a changed model never reuses a cache
            files = [p for p in self.model_dir.iterdir() if p.is_file()]
            ident["model_files_sha256"] = _file_fingerprint(files, content_hash)
        if self.data_files is not None:
            ident["sample_by"] = self.sample_by
            if self.data_files[0] != "disk":
                ident["data_files_sha256"] = _file_fingerprint(
                    [Path(f) for f in self.data_files[1]], content_hash
                )
        return ident

    # -- text -------------------------------------------------------------------------------------
    def _load_dataset(self):
        try:
            import datasets
        except ImportError as e:
            raise SourceUnavailable(
                f"the {self.source_name} source reads text with `datasets` (pip install "
                f"datasets). {OFFLINE_HINT}"
            ) from e
        try:
            if self.data_files is None:
                return datasets.load_dataset(
                    self.dataset, self.dataset_config, split=self.dataset_split, streaming=True
                )
            builder, files = self.data_files
            if builder == "disk":
                ds = datasets.load_from_disk(files[0])
                if isinstance(ds, datasets.DatasetDict):
                    ds = ds[self.dataset_split]
                return ds.to_iterable_dataset()
            extra = {"sample_by": self.sample_by} if builder == "text" else {}
            return datasets.load_dataset(
                builder, data_files=files, split="train", streaming=True, **extra
            )
        except ConfigError:
            raise
        except Exception as e:
            raise SourceUnavailable(
                f"the {self.source_name} source could not read dataset {self.dataset!r} "
                f"({type(e).__name__}: {e}). {OFFLINE_HINT}"
            ) from e

    def _documents(self, pass_idx: int) -> Iterator[str]:
        """Texts of the dataset, shuffled with a seed per pass."""
        ds = self._load_dataset().shuffle(
            seed=self.seed + pass_idx, buffer_size=self.shuffle_buffer_docs
        )
        for ex in ds:
            if self.text_field not in ex:
                raise ConfigError(
                    f"dataset {self.dataset!r} has no field {self.text_field!r}; its fields are "
                    f"{sorted(ex)}: pass text_field=."
                )
            text = ex[self.text_field]
            if isinstance(text, str) and text.strip():
                yield text.strip()

    def _windows(self, pass_idx: int, held_out: bool) -> Iterator[torch.Tensor]:
        """Chunks (harvest_contexts, T) of BOS-led token windows."""
        T = self.context_len
        buf: list[int] = []
        batch: list[list[int]] = []
        texts: list[str] = []

        def flush_texts() -> Iterator[torch.Tensor]:
            nonlocal buf, batch
            for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]:
                buf.extend([self.bos, *ids])
                while len(buf) >= T - 1:
                    batch.append([self.bos, *buf[: T - 1]])
                    buf = buf[T - 1 :]
                    if len(batch) == self.harvest_contexts:
                        yield torch.tensor(batch)
                        batch = []

        for text in self._documents(pass_idx):
            if in_held_out(text, self.held_out_fraction) != held_out:
                continue
            texts.append(text)
            if len(texts) == 64:
                yield from flush_texts()
                texts = []
        if texts:
            yield from flush_texts()
        if batch:
            yield torch.tensor(batch)

    def _contexts(self, pass_idx: int) -> Iterator[torch.Tensor]:
        return self._windows(pass_idx, held_out=False)

    # -- activations ------------------------------------------------------------------------------
    def harvest(self, contexts: torch.Tensor) -> torch.Tensor:
        """Activations (n, T, d) at the hook, on the CPU in float32."""
        from .tiny import activations_at

        return activations_at(self.model, contexts.to(self.device), self.hook).float().cpu()

    def eval_contexts(self, n_contexts: int) -> torch.Tensor:
        """The first n held-out windows (n, T), in a fixed order."""
        out: list[torch.Tensor] = []
        n = 0
        for w in self._windows(0, held_out=True):
            out.append(w)
            n += w.shape[0]
            if n >= n_contexts:
                return torch.cat(out)[:n_contexts]
        raise ValueError(
            f"the held-out documents of {self.dataset!r} give only {n} windows of "
            f"{self.context_len} tokens; ask for at most {n}, or raise held_out_fraction."
        )

    def batches(self, batch_size: int, start_batch: int = 0) -> Iterator[torch.Tensor]:
        """Endless (batch_size, d_in) float32 batches from the shuffled buffer."""
        return self.store.batches(batch_size, start_batch)

    def held_out(self, n_tokens: int) -> torch.Tensor:
        """(n_tokens, d_in) float32 from held-out documents, filtered like training data."""
        probe = ActivationStore(self.harvest, self._contexts, self.d_in, self.store.cfg)
        out, n = [], 0
        for w in self._windows(0, held_out=True):
            v = probe.filter(self.harvest(w))
            out.append(v)
            n += v.shape[0]
            if n >= n_tokens:
                return torch.cat(out)[:n_tokens]
        raise ValueError(
            f"the held-out documents gave only {n} vectors; ask for at most {n}, or raise "
            f"held_out_fraction."
        )

    def describe(self) -> dict[str, Any]:
        return {**self._ident, "d_in": self.d_in, **self.store.describe()}


__all__ = [
    "HFSource",
    "OFFLINE_HINT",
    "SourceUnavailable",
    "cached_snapshot",
    "check_available",
    "hub_reachable",
    "hub_unreachable_reason",
    "in_held_out",
    "local_data_files",
    "offline_env",
]
