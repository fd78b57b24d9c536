"""The model side of the server: one base patched with the served pack, the three forward
passes the scheduler batches (prefill, one decoding step, classify), and reloading the pack
when it changes on disk.

Only the scheduler's thread calls into an Engine, so nothing here locks. Request routes are
checked against the engine's current tasks when the scheduler admits a request, which is what
makes a task added to (or removed from) the served pack answerable (or 404) without a restart.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence as Seq
from pathlib import Path

import torch
from torch import Tensor

from qmerge.errors import ConfigError, UnknownTask
from qmerge.routing.route import AUTO, parse_route
from qmerge.serve.kv import KV
from qmerge.serve.sequence import Sequence
from qmerge.verbs import run as inference
from qmerge.verbs.load import load
from qmerge.verbs.packs import open_pack, verify

log = logging.getLogger("qmerge.serve")


class Engine:
    def __init__(
        self,
        pack: str | os.PathLike,
        base: str | os.PathLike,
        *,
        dtype: torch.dtype | None = None,
        mode: str = "auto",
        threads: int | None = None,
    ):
        if threads:
            torch.set_num_threads(threads)
        self.pack_path, self.base_path = Path(pack), Path(base)
        self.mode = mode
        self.model = load(self.base_path, self.pack_path, dtype=dtype, mode=mode)
        # one tokenizer for the scheduler thread, one for request handlers: a fast tokenizer
        # refuses concurrent use ("Already borrowed")
        self.tok = inference.tokenizer(self.base_path)
        self.front_tok = inference.tokenizer(self.base_path)
        self._front_lock = threading.Lock()
        self.kind = inference.kind_of(self.model)
        cfg = self.model.config
        self.context = int(getattr(cfg, "max_position_embeddings", 0) or 4096)
        eos = cfg.eos_token_id if cfg.eos_token_id is not None else self.tok.eos_token_id
        self.eos = frozenset(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self.reload_error: str | None = None
        self._stamp = self._manifest_stamp()
        self._refresh()

    # --- what is served ------------------------------------------------------------------

    def _refresh(self) -> None:
        h = self.model.qmerge
        self.tasks: tuple[str, ...] = tuple(h.tasks)
        self.has_router = h.router is not None
        self.labels = {t: h.labels(t) for t in self.tasks}

    def _manifest_stamp(self) -> tuple:
        try:
            st = os.stat(self.pack_path / "manifest.json")
        except OSError:
            return ()
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def changed(self) -> bool:
        """Whether the pack on disk is not the one loaded (a cheap stat, polled)."""
        return self._manifest_stamp() != self._stamp

    def reload(self) -> None:
        """Re-patches the model with the pack as it is now on disk. Called with no sequence in
        flight. A pack that cannot be served (corrupt, another base) is refused and the old
        one stays: the error is logged and shown by /health."""
        stamp = self._manifest_stamp()
        old = self.model.qmerge.pack
        try:
            new = open_pack(self.pack_path)
            same = new.base_fingerprint["content"] == old.base_fingerprint["content"]
            if not same:
                raise ConfigError(
                    f"{self.pack_path}: the pack now belongs to another base; "
                    f"restart the server with that base"
                )
            # every file and residual checked before the model is touched: a pack that fails
            # half-way through re-patching could leave no tasks patched at all
            verify(self.pack_path)
            handle = self.model.qmerge
            model = handle.unload()
            try:
                self.model = load(model, new, mode=self.mode, check_base=False)
            except Exception:
                self.model = load(model, old, mode=self.mode, check_base=False)
                raise
        except Exception as e:  # noqa: BLE001 - any fault keeps the old pack serving
            self.reload_error = f"{type(e).__name__}: {e}"
            log.error(
                "reloading %s failed, still serving the previous tasks: %s",
                self.pack_path,
                self.reload_error,
            )
        else:
            self.reload_error = None
            log.info("reloaded %s: tasks %s", self.pack_path, ", ".join(self.model.qmerge.tasks))
        self._stamp = stamp
        self._refresh()

    def check_route(self, model: str) -> object:
        """A request's `model` field -> a route entry ('base', a task, a mixture dict, or
        'auto'); UnknownTask (404) or ConfigError (400) when it names no served route."""
        try:
            return parse_route(model, self.tasks, router=self.has_router)
        except UnknownTask as e:
            raise UnknownTask(
                f"the model {e.name!r} does not exist: served tasks are "
                f"{', '.join(self.tasks) or 'none'}, 'base', 'auto' or a mixture "
                f"such as 'a:0.7+b:0.3'",
                e.name,
            ) from None
        except ConfigError:
            if model == AUTO:
                raise ConfigError(
                    f"model 'auto' routes with the pack's router, and "
                    f"{self.pack_path.name} has none; name a task"
                ) from None
            raise

    def encode(self, text: str) -> list[int]:
        """Token ids of a prompt (request-handler side)."""
        with self._front_lock:
            return list(self.front_tok(text, add_special_tokens=True)["input_ids"])

    def chat_prompt(self, messages: list[dict]) -> str:
        with self._front_lock:
            tok = self.front_tok
            if getattr(tok, "chat_template", None):
                return str(
                    tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
                )
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"

    def decode(self, ids: Seq[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    # --- forward passes (scheduler thread) ---------------------------------------------------

    def resolve_auto(self, texts: list[str]) -> list[dict]:
        """Mixtures the router picks for prompts (one base forward to its feature layer)."""
        reqs = [{"text": t, AUTO: True} for t in texts]
        return inference.routes(self.model, self.tok, reqs, max_length=self.context)

    def prefill(self, seqs: list[Sequence]) -> tuple[Tensor, KV]:
        """One forward over new prompts (left-padded): next-token logits [B, V] and their KV."""
        n = max(len(s.prompt) for s in seqs)
        pad = self.tok.pad_token_id or 0
        ids = torch.tensor([[pad] * (n - len(s.prompt)) + s.prompt for s in seqs])
        lens = torch.tensor([len(s.prompt) for s in seqs])
        mask = (torch.arange(n)[None, :] >= (n - lens)[:, None]).long()
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        with torch.no_grad():
            out = self.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=pos,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
                **inference.route_kwargs([s.route for s in seqs], self.tasks),
            )
        return out.logits[:, -1].float(), KV.from_cache(out.past_key_values, lens)

    def step(self, seqs: list[Sequence], kv: KV) -> tuple[Tensor, KV]:
        """One decoding step for every sequence of a running batch."""
        ids = torch.tensor([[s.last] for s in seqs])
        with torch.no_grad():
            out = self.model(
                input_ids=ids,
                attention_mask=kv.mask(1),
                position_ids=kv.lens[:, None].clone(),
                past_key_values=kv.to_cache(self.model.config),
                use_cache=True,
                **inference.route_kwargs([s.route for s in seqs], self.tasks),
            )
        return out.logits[:, -1].float(), KV.from_cache(out.past_key_values, kv.lens + 1)

    def classify(self, items: list[tuple[str, object]]) -> list[dict]:
        """Label and scores for (text, route) pairs, in one mixed forward."""
        reqs = [
            {"text": text, "coeffs": route}
            if isinstance(route, dict)
            else {"text": text, "task": route}
            for text, route in items
        ]
        return inference.answer(self.model, self.tok, reqs, "classify", 0, self.context)
