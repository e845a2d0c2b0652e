"""A trained model as ONE self-describing directory: what `sample --model DIR` loads.

```
BUNDLE/
  bundle.json       {"format": "dalle_jax.bundle.v1", "transformer": DalleConfig dict,
                     "vqvae": VQVAEConfig dict, "reranker": config dict or null,
                     "sampling": {"temperature", "top_k", "top_p", "cfg_scale",
                                  optional "rerank_per_image", "rerank_likelihood_weight"},
                     "provenance": {free-form}}
  tokenizer.model   the sentencepiece model
  transformer/      orbax checkpoint: pure dict of nnx.state(transformer) (Params only)
  vqvae/            orbax checkpoint: pure dict of nnx.state(vqvae) (weights + codebook)
  reranker/         orbax checkpoint of the reranker state (only when "reranker" is not null)
```
`export_bundle` writes one (weights optionally stored as bfloat16 to keep shipped bundles
small); `load_bundle` reads one back, checking every file against the configs, and casts the
weights back to the models' own dtypes (float32 parameters). A bundle needs no training config,
workdir or data. Every bad input is a one-line `UserError` naming the file and what to do.

Export runs in one process: the arrays are pulled to the host first.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from dalle_jax.errors import UserError
from dalle_jax.model.config import DalleConfig
from dalle_jax.model.transformer import DalleTransformer
from dalle_jax.sampling import (
    RERANK_KEYS,
    RERANK_LIKELIHOOD_WEIGHT,
    RERANK_PER_IMAGE,
    check_rerank_likelihood_weight,
    check_rerank_per_image,
)
from dalle_jax.tokenizer import TextTokenizer
from vqvae.config import VQVAEConfig
from vqvae.errors import VQVAEInputError
from vqvae.model import VQVAE, create_model

BUNDLE_FORMAT = "dalle_jax.bundle.v1"
BUNDLE_JSON = "bundle.json"
TOKENIZER_FILE = "tokenizer.model"
TRANSFORMER_DIR = "transformer"
VQVAE_DIR = "vqvae"
RERANKER_DIR = "reranker"
WEIGHTS_DTYPES = ("float32", "bfloat16")
# Shipped bundles: `load_bundle("shapes")` -> dalle_jax/bundles/shapes/.
SHIPPED_BUNDLES_DIR = Path(__file__).resolve().parent / "bundles"
DEFAULT_SAMPLING: dict[str, Any] = {
    "temperature": 1.0,
    "top_k": None,
    "top_p": None,
    "cfg_scale": 1.0,
}

# What reading a damaged orbax folder raises: missing files (OSError), garbled ones
# (tensorstore's ValueError, json's JSONDecodeError), another layout (KeyError, TypeError).
_READ_ERRORS = (OSError, ValueError, KeyError, EOFError, TypeError, RuntimeError)


@dataclasses.dataclass
class Bundle:
    """A loaded bundle: the models ready to sample with, and what bundle.json said."""

    transformer: DalleTransformer
    vqvae: VQVAE
    tokenizer: TextTokenizer
    reranker: BundleReranker | None
    sampling: dict[str, Any]  # DEFAULT_SAMPLING updated with the bundle's own defaults
    path: Path
    meta: dict[str, Any]  # the parsed bundle.json

    @property
    def transformer_config(self) -> DalleConfig:
        return self.transformer.config

    @property
    def vqvae_config(self) -> VQVAEConfig:
        return self.vqvae.config


# ------------------------------------------------------------------------------------ helpers


def _one_line(error: BaseException, limit: int = 160) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings -> {"blocks.0.attn.kernel": leaf}; keys as strings (orbax's metadata
    spells list indices as strings, a pure dict as ints)."""
    if isinstance(tree, Mapping):
        flat: dict[str, Any] = {}
        for key, value in tree.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: tree}


def _pure_dict(state: Any, *, params_only: bool) -> dict[str, Any]:
    """An nnx module, an nnx.State or a pure dict -> a pure dict of host numpy arrays."""
    if isinstance(state, nnx.Module):
        state = nnx.state(state, nnx.Param) if params_only else nnx.state(state)
    if isinstance(state, nnx.State):
        if params_only:
            state = nnx.filter_state(state, nnx.Param)
        state = nnx.to_pure_dict(state)
    if not isinstance(state, Mapping):
        raise TypeError(f"expected an nnx module, nnx.State or a dict, got {type(state).__name__}")
    return jax.tree.map(np.asarray, jax.device_get(dict(state)))


def _cast_floats(tree: Any, dtype: str) -> Any:
    """float32 leaves -> `dtype`; integer leaves (counters) stay as they are."""
    target = jnp.dtype(dtype)
    return jax.tree.map(
        lambda x: x.astype(target) if x.dtype == np.float32 else x,
        tree,
    )


def _abstract_transformer(config: DalleConfig) -> tuple[nnx.GraphDef, nnx.State]:
    """(graph, abstract Params) of a transformer of `config`; it has no other variables."""
    abstract = nnx.eval_shape(lambda: DalleTransformer(config, rngs=nnx.Rngs(0)))
    return nnx.split(abstract, nnx.Param)


def _abstract_vqvae(config: VQVAEConfig) -> tuple[nnx.GraphDef, nnx.State]:
    return nnx.split(nnx.eval_shape(lambda: create_model(config)))


def _shape_problem(saved: Mapping[str, Any], wanted: Mapping[str, Any]) -> str | None:
    """The first difference between two flat {path: leaf with .shape} trees, or None."""
    missing = sorted(wanted.keys() - saved.keys())
    unexpected = sorted(saved.keys() - wanted.keys())
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
        if unexpected:
            more = " ..." if len(unexpected) > 3 else ""
            parts.append(f"unexpected {', '.join(unexpected[:3])}{more}")
        return "; ".join(parts)
    for key in sorted(wanted):
        if tuple(saved[key].shape) != tuple(wanted[key].shape):
            return (
                f"{key} has shape {list(saved[key].shape)} in the weights but "
                f"{list(wanted[key].shape)} in the config"
            )
    return None


def _checkpointer() -> ocp.StandardCheckpointer:
    """Bundles are written and read by one process alone: no barriers with other hosts."""
    me = jax.process_index()
    options = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
    return ocp.StandardCheckpointer(multiprocessing_options=options)


def _save_weights(directory: Path, tree: Mapping[str, Any]) -> None:
    with _checkpointer() as checkpointer:
        # orbax refuses relative paths; `--out bundles/mine` is a normal thing to type.
        checkpointer.save(Path(directory).absolute(), dict(tree))


def _restore_weights(directory: Path, abstract_state: nnx.State, *, what: str) -> dict:
    """The orbax folder `directory` restored against the abstract model state (its dtypes:
    bfloat16 files come back as float32), after checking names and shapes. UserError otherwise.
    """
    redo = "the bundle is damaged or incomplete: export it again (`train export`)"
    directory = Path(directory).absolute()  # orbax reads absolute paths only
    if not directory.is_dir():
        raise UserError(f"{directory}: missing {what} weights folder; {redo}")
    wanted = nnx.to_pure_dict(abstract_state)
    try:
        with _checkpointer() as checkpointer:
            metadata = checkpointer.metadata(directory)
        saved = getattr(getattr(metadata, "item_metadata", None), "tree", None)
    except _READ_ERRORS as e:
        raise UserError(
            f"{directory}: the {what} weights cannot be read ({_one_line(e)}); {redo}"
        ) from None
    if not isinstance(saved, Mapping):
        raise UserError(
            f"{directory}: the {what} weights cannot be read (no array metadata); {redo}"
        )
    problem = _shape_problem(_flatten(saved), _flatten(wanted))
    if problem:
        raise UserError(
            f"{directory}: the {what} weights do not fit the {what} config in {BUNDLE_JSON} "
            f"({problem}); the weights and bundle.json are of different models: export it again"
        )
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), wanted)
    try:
        with _checkpointer() as checkpointer:
            restored = checkpointer.restore(directory, target)
    except _READ_ERRORS as e:
        raise UserError(
            f"{directory}: the {what} weights cannot be read ({_one_line(e)}); {redo}"
        ) from None
    return jax.tree.map(jnp.asarray, restored)


def _build(graphdef: nnx.GraphDef, abstract_state: nnx.State, tree: Mapping[str, Any]) -> Any:
    nnx.replace_by_pure_dict(abstract_state, tree)
    return nnx.merge(graphdef, abstract_state)


def _check_sampling(sampling: Mapping[str, Any] | None, where: str) -> dict[str, Any]:
    sampling = dict(sampling or {})
    known = {*DEFAULT_SAMPLING, *RERANK_KEYS}  # the last ones optional: default reranking
    unknown = sorted(set(sampling) - known)
    if unknown:
        raise UserError(f"{where}: unknown sampling setting(s) {unknown}; known: {sorted(known)}")
    if RERANK_PER_IMAGE in sampling:
        check_rerank_per_image(sampling[RERANK_PER_IMAGE], where)
    if RERANK_LIKELIHOOD_WEIGHT in sampling:
        check_rerank_likelihood_weight(sampling[RERANK_LIKELIHOOD_WEIGHT], where)
    return {**DEFAULT_SAMPLING, **sampling}


def check_compatible(
    transformer_config: DalleConfig,
    vqvae_config: VQVAEConfig,
    tokenizer_vocab_size: int | None = None,
    *,
    where: str = "bundle",
) -> None:
    """Raises `UserError` unless the transformer's image grid and image vocabulary are the
    vqvae's (and its text vocabulary the tokenizer's, when given)."""
    t, v = transformer_config, vqvae_config
    pairs = [
        ("image grid", (t.image_rows, t.image_cols), (v.grid_size, v.grid_size), "vqvae"),
        ("image vocabulary", t.image_vocab_size, v.codebook_size, "vqvae"),
    ]
    if tokenizer_vocab_size is not None:
        pairs.append(("text vocabulary", t.text_vocab_size, tokenizer_vocab_size, "tokenizer"))
    for name, ours, theirs, other in pairs:
        if ours != theirs:
            raise UserError(
                f"{where}: the transformer's {name} is {ours} but the {other}'s is {theirs}; "
                f"use the {other} the transformer was trained with"
            )


def _tokenizer_from_bytes(data: bytes, where: str) -> TextTokenizer:
    try:
        return TextTokenizer.from_bytes(data)
    except RuntimeError as e:  # sentencepiece's parse error
        raise UserError(f"{where} is not a sentencepiece model ({_one_line(e)})") from e


def _replace_dir(temporary: Path, final: Path) -> None:
    """Moves the finished `temporary` folder to `final`, replacing what was there."""
    if final.exists():
        old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
        final.rename(old)
        temporary.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        temporary.rename(final)


# ------------------------------------------------------------------------------------ export


def export_bundle(
    out_dir: str | os.PathLike,
    *,
    transformer_config: DalleConfig,
    transformer_state: Any,
    vqvae_config: VQVAEConfig,
    vqvae_state: Any,
    tokenizer_bytes: bytes,
    sampling: Mapping[str, Any] | None = None,
    reranker_config: Any | None = None,
    reranker_state: Any | None = None,
    provenance: Mapping[str, Any] | None = None,
    weights_dtype: str = "float32",
    overwrite: bool = False,
) -> Path:
    """Writes a bundle to `out_dir` and returns its path.

    transformer_state: the DalleTransformer (module, `nnx.state` or its pure dict; Params are
    kept); vqvae_state: the VQVAE (module, state or pure dict, all of its variables);
    tokenizer_bytes: the sentencepiece model (`TextTokenizer.to_bytes()`); sampling: default
    sampling settings (keys of `DEFAULT_SAMPLING`); reranker_config (a dataclass with
    `to_dict()`, or a dict) with reranker_state: optional; provenance: free-form JSON.
    weights_dtype: "float32" or "bfloat16" (float32 arrays are stored in it; `load_bundle`
    casts back). The bundle is written to a temporary folder beside `out_dir` and renamed when
    complete, so an interrupted export leaves no half bundle. An existing non-empty `out_dir`
    is a `UserError` unless `overwrite`.
    """
    out_dir = Path(out_dir)
    if weights_dtype not in WEIGHTS_DTYPES:
        raise UserError(f"weights dtype {weights_dtype!r}: use one of {', '.join(WEIGHTS_DTYPES)}")
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"bundle output {out_dir} is a file; pass a folder path")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise UserError(
            f"bundle output {out_dir} already exists and is not empty; pick another folder or "
            "overwrite it (--overwrite)"
        )
    if (reranker_config is None) != (reranker_state is None):
        raise ValueError("pass reranker_config and reranker_state together")
    tokenizer = _tokenizer_from_bytes(bytes(tokenizer_bytes), "tokenizer_bytes")
    check_compatible(transformer_config, vqvae_config, tokenizer.vocab_size, where="export")
    sampling = _check_sampling(sampling, "export")

    trees = {
        TRANSFORMER_DIR: (
            _pure_dict(transformer_state, params_only=True),
            _abstract_transformer(transformer_config)[1],
        ),
        VQVAE_DIR: (
            _pure_dict(vqvae_state, params_only=False),
            _abstract_vqvae(vqvae_config)[1],
        ),
    }
    for name, (tree, abstract) in trees.items():
        problem = _shape_problem(_flatten(tree), _flatten(nnx.to_pure_dict(abstract)))
        if problem:
            raise UserError(f"export: the {name} state does not fit its config ({problem})")

    meta = {
        "format": BUNDLE_FORMAT,
        "transformer": transformer_config.to_dict(),
        "vqvae": vqvae_config.to_dict(),
        "reranker": None,
        "sampling": sampling,
        "weights_dtype": weights_dtype,
        "provenance": dict(provenance or {}),
    }
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    temporary = out_dir.with_name(f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        temporary.mkdir()
        (temporary / TOKENIZER_FILE).write_bytes(tokenizer.to_bytes())
        for name, (tree, _) in trees.items():
            _save_weights(temporary / name, _cast_floats(tree, weights_dtype))
        if reranker_config is not None:
            meta["reranker"] = _config_dict(reranker_config)
            tree = _checked_reranker_state(meta["reranker"], reranker_state, tokenizer)
            _save_weights(temporary / RERANKER_DIR, _cast_floats(tree, weights_dtype))
        (temporary / BUNDLE_JSON).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        _replace_dir(temporary, out_dir)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return out_dir


def _config_dict(config: Any) -> dict[str, Any]:
    if hasattr(config, "to_dict"):
        return config.to_dict()
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return dataclasses.asdict(config)
    if isinstance(config, Mapping):
        return dict(config)
    raise TypeError(f"a config must have to_dict(), be a dataclass or a dict: {type(config)}")


def _checked_reranker_state(
    config_dict: Mapping[str, Any], state: Any, tokenizer: TextTokenizer
) -> dict[str, Any]:
    """The reranker state as a pure dict, checked against its config and the tokenizer."""
    from dalle_jax import reranker as reranker_lib

    config = reranker_lib.RerankerConfig.from_dict(dict(config_dict))
    reranker_lib.check_tokenizer(config, tokenizer)
    tree = _pure_dict(state, params_only=False)
    abstract = nnx.state(nnx.eval_shape(lambda: reranker_lib.create_reranker(config)))
    problem = _shape_problem(_flatten(tree), _flatten(nnx.to_pure_dict(abstract)))
    if problem:
        raise UserError(f"the reranker state does not fit its config ({problem})")
    return tree


def add_reranker(bundle_dir: str | os.PathLike, reranker_config: Any, reranker_state: Any) -> Path:
    """Adds (or replaces) the reranker of an existing bundle; returns the bundle's path.

    reranker_config: a config with `to_dict()` (or a dict); reranker_state: the reranker
    (module, nnx.State or pure dict), stored in the dtype of the bundle's other weights.
    """
    path = resolve_bundle_path(bundle_dir)
    meta = read_bundle_json(path)
    weights_dtype = meta.get("weights_dtype", "float32")
    if weights_dtype not in WEIGHTS_DTYPES:
        weights_dtype = "float32"
    tokenizer = TextTokenizer.from_file(path / TOKENIZER_FILE)
    config_dict = _config_dict(reranker_config)
    tree = _checked_reranker_state(config_dict, reranker_state, tokenizer)
    tree = _cast_floats(tree, weights_dtype)
    temporary = path / f".{RERANKER_DIR}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        _save_weights(temporary, tree)
        _replace_dir(temporary, path / RERANKER_DIR)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    meta["reranker"] = config_dict
    json_path = path / BUNDLE_JSON
    staged = path / f".{BUNDLE_JSON}.tmp"
    staged.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    os.replace(staged, json_path)
    return path


# ------------------------------------------------------------------------------------ load


def shipped_bundles() -> list[str]:
    """Names of the bundles that ship inside the package (`dalle_jax/bundles/<name>/`)."""
    if not SHIPPED_BUNDLES_DIR.is_dir():
        return []
    return sorted(p.name for p in SHIPPED_BUNDLES_DIR.iterdir() if (p / BUNDLE_JSON).is_file())


def resolve_bundle_path(path_or_name: str | os.PathLike) -> Path:
    """A bundle directory, or the name of a shipped bundle -> its folder. UserError if neither."""
    path = Path(path_or_name).expanduser()
    name = str(path_or_name)
    bare_name = name and os.sep not in name and "/" not in name and not name.startswith(".")
    shipped = SHIPPED_BUNDLES_DIR / name if bare_name else None
    # A shipped bundle's name wins over a folder of that name that is not a bundle (say the
    # `--out shapes` of an earlier `sample`): `--model shapes` must not break in that folder.
    if shipped is not None and shipped.is_dir() and not (path / BUNDLE_JSON).is_file():
        return shipped
    if path.is_dir():
        return path
    if path.exists():
        raise UserError(f"bundle {str(path)!r} is a file; pass the bundle's folder")
    known = shipped_bundles()
    names = f"shipped bundles: {', '.join(known)}" if known else "no bundle ships with this install"
    raise UserError(
        f"bundle {name!r} not found: no such folder and no shipped bundle of that name ({names}); "
        "pass a folder written by `train export`"
    )


def read_bundle_json(path: Path) -> dict[str, Any]:
    """The checked bundle.json of the bundle folder `path` (format and top-level fields)."""
    json_path = path / BUNDLE_JSON
    if not json_path.is_file():
        raise UserError(
            f"{json_path}: missing; {path} is not a bundle folder (write one with `train export`)"
        )
    try:
        meta = json.loads(json_path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(
            f"{json_path}: cannot be read ({_one_line(e)}); export the bundle again"
        ) from None
    except json.JSONDecodeError as e:
        raise UserError(
            f"{json_path}: not valid JSON ({e.msg}, line {e.lineno}); the file is damaged: "
            "export the bundle again"
        ) from None
    if not isinstance(meta, dict):
        raise UserError(f"{json_path}: expected a JSON object; export the bundle again")
    if meta.get("format") != BUNDLE_FORMAT:
        raise UserError(
            f"{json_path}: format {meta.get('format')!r}, expected {BUNDLE_FORMAT!r}; export the "
            "bundle again with this version (`train export`)"
        )
    for key in ("transformer", "vqvae"):
        if not isinstance(meta.get(key), dict):
            raise UserError(f"{json_path}: no {key!r} config; export the bundle again")
    return meta


def _transformer_config(meta: Mapping[str, Any], json_path: Path) -> DalleConfig:
    try:
        return DalleConfig.from_dict(dict(meta["transformer"]))
    except (UserError, TypeError, ValueError) as e:
        raise UserError(f"{json_path}: bad transformer config ({_one_line(e)})") from None


def _vqvae_config(meta: Mapping[str, Any], json_path: Path) -> VQVAEConfig:
    try:
        return VQVAEConfig.from_dict(dict(meta["vqvae"]))
    except (VQVAEInputError, TypeError, ValueError) as e:
        raise UserError(f"{json_path}: bad vqvae config ({_one_line(e)})") from None


@dataclasses.dataclass
class BundleReranker:
    """A bundle's reranker: the model (`dalle_jax.reranker.Reranker`) with the bundle's
    tokenizer, so that it scores images against prompt strings (`generate_images(rerank=M)`)."""

    model: Any
    tokenizer: TextTokenizer

    @property
    def config(self) -> Any:
        return self.model.config

    def score(self, images: np.ndarray, prompts: list[str]) -> np.ndarray:
        """images: uint8 [M, S, S, 3]; prompts: M strings. Returns float32 [M] (higher fits
        better): `dalle_jax.reranker.score` on the prompts' ids."""
        from dalle_jax import reranker as reranker_lib

        text_ids = self.tokenizer.encode(list(prompts), self.model.config.text_length)
        return reranker_lib.score(self.model, images, text_ids)


def _load_reranker(
    config_dict: Mapping[str, Any], directory: Path, tokenizer: TextTokenizer
) -> BundleReranker:
    """The reranker from its config dict (`dalle_jax.reranker.RerankerConfig`) and weights."""
    from dalle_jax import reranker as reranker_lib

    json_path = directory.parent / BUNDLE_JSON
    try:
        config = reranker_lib.RerankerConfig.from_dict(dict(config_dict))
    except (UserError, TypeError, ValueError) as e:
        raise UserError(f"{json_path}: bad reranker config ({_one_line(e)})") from None
    try:
        reranker_lib.check_tokenizer(config, tokenizer)
    except UserError as e:
        raise UserError(f"{directory}: {e}") from None
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: reranker_lib.create_reranker(config)))
    tree = _restore_weights(directory, abstract, what="reranker")
    return BundleReranker(_build(graphdef, abstract, tree), tokenizer)


def load_bundle(path_or_name: str | os.PathLike) -> Bundle:
    """Loads a bundle folder, or a shipped bundle by name (`dalle_jax/bundles/<name>/`).

    Every file is checked before use: bundle.json (parse, format, configs), tokenizer.model,
    each weights folder against its config (names and shapes). Any problem is a one-line
    `UserError` naming the file and what to do. Weights come back in the models' own dtypes.
    """
    path = resolve_bundle_path(path_or_name)
    meta = read_bundle_json(path)
    json_path = path / BUNDLE_JSON
    transformer_config = _transformer_config(meta, json_path)
    vqvae_config = _vqvae_config(meta, json_path)
    sampling = _check_sampling(meta.get("sampling"), str(json_path))

    tokenizer_path = path / TOKENIZER_FILE
    if not tokenizer_path.is_file():
        raise UserError(
            f"{tokenizer_path}: missing; the bundle is incomplete: export it again (`train export`)"
        )
    tokenizer = TextTokenizer.from_file(tokenizer_path)
    check_compatible(transformer_config, vqvae_config, tokenizer.vocab_size, where=str(path))

    graphdef, abstract = _abstract_transformer(transformer_config)
    tree = _restore_weights(path / TRANSFORMER_DIR, abstract, what="transformer")
    transformer = _build(graphdef, abstract, tree)

    graphdef, abstract = _abstract_vqvae(vqvae_config)
    tree = _restore_weights(path / VQVAE_DIR, abstract, what="vqvae")
    vqvae = _build(graphdef, abstract, tree)

    reranker = None
    if meta.get("reranker") is not None:
        if not isinstance(meta["reranker"], Mapping):
            raise UserError(f"{json_path}: 'reranker' must be a config object or null")
        reranker = _load_reranker(meta["reranker"], path / RERANKER_DIR, tokenizer)
    return Bundle(
        transformer=transformer,
        vqvae=vqvae,
        tokenizer=tokenizer,
        reranker=reranker,
        sampling=sampling,
        path=path,
        meta=meta,
    )
