"""The ``scmoesim`` command line.

``scmoesim fit``
    Register an ``.h5ad`` (layer, batch, labels, signatures, embedding), train MoESim, write the
    annotated AnnData (``obsm["X_moesim"]``, ``obs["moesim_cluster"]``, ``obsm["moesim_proba"]``,
    ``uns["moesim"]``) and optionally save the model. ``--umap`` computes the paper's UMAP
    projection for the unsupervised kNN similarity (``obsm["X_umap_moesim"]`` of the output).
``scmoesim generate``
    Load a saved model and generate new cells of chosen clusters into an ``.h5ad``.
``scmoesim demo``
    The main job on bundled data (scanpy's ``pbmc68k_reduced`` with PBMC marker signatures):
    prints the agreement with the known ``bulk_labels`` and writes the annotated ``.h5ad`` and a
    UMAP figure next to it.

Errors in the input (missing files, keys or genes, bad values) are reported as one line
``error: ...`` on stderr with exit code 1; outputs are never overwritten without ``--force``.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    from anndata import AnnData

# Copies of the model's constants: importing them would load torch before --help.
_LIKELIHOODS = ("nb", "zinb", "poisson", "normal", "bernoulli")
_UNSUPERVISED_N_EXPERTS = 20
_UMAP_KEY = "X_umap_moesim"  # not X_umap: a 2-D plotting layout in the input stays as it is
_QUIET_LOGGERS = (
    "lightning",
    "lightning.pytorch",
    "lightning.fabric",
    "lightning_fabric",
    "pytorch_lightning",
    "scvi",
)
_HEADER_WORDS = {
    "cluster",
    "clusters",
    "signature",
    "signatures",
    "name",
    "cell_type",
    "celltype",
    "cell type",
    "type",
    "population",
    "label",
    "gene",
    "genes",
    "marker",
    "markers",
    "marker_gene",
    "marker gene",
    "symbol",
    "gene_symbol",
    "gene_name",
    "feature",
    "features",
}


class CLIError(Exception):
    """An error in the user's input, printed as one ``error: ...`` line."""


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def _one_line(err: BaseException) -> str:
    """The message of an exception on one line (KeyError without its quotes)."""
    if isinstance(err, KeyError) and len(err.args) == 1 and isinstance(err.args[0], str):
        msg = err.args[0]
    else:
        msg = str(err)
    msg = " ".join(msg.split())
    return msg or type(err).__name__


@contextmanager
def _user_errors(prefix: str = "") -> Iterator[None]:
    """Turn the errors that setup, the model and loading raise for bad input into CLIErrors."""
    try:
        yield
    except CLIError:
        raise
    except (ValueError, KeyError, FileNotFoundError, TypeError) as err:
        raise CLIError(prefix + _one_line(err)) from err
    except Exception as err:
        # Lightning's MisconfigurationException (e.g. --accelerator gpu without a GPU)
        if type(err).__name__ == "MisconfigurationException":
            raise CLIError(prefix + _one_line(err)) from err
        raise


@contextmanager
def _quiet_logs(quiet: bool) -> Iterator[None]:
    """Silence Lightning's and scvi-tools' INFO messages while ``quiet``."""
    if not quiet:
        yield
        return
    loggers = [logging.getLogger(name) for name in _QUIET_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Print warnings as one ``warning: ...`` line (no source location)."""
    print(f"warning: {' '.join(str(message).split())}", file=sys.stderr)


def _check_output(path: Path, force: bool, what: str = "", directory: bool = False) -> None:
    """Before any work: the output may be written (a file, or with ``directory`` a folder)."""
    if path.exists() and not force:
        raise CLIError(f"{what}{path} exists; pass --force to overwrite it.")
    if path.exists() and path.is_dir() != directory:
        kind = "a file" if directory else "a folder"
        raise CLIError(f"{what}{path} is {kind}; choose another name.")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise CLIError(f"cannot create {what}{path}: {parent} is a file.")


@contextmanager
def _stop_on_interrupt(model) -> Iterator[None]:
    """Make a Ctrl-C during ``model.train`` stop the command (exit 130, nothing written).

    The Python API keeps a model whose training was interrupted, with a warning that it can
    be used; a command would then write a partly trained model as if it had finished.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Training interrupted", category=UserWarning)
        yield
    if getattr(model, "_interrupted", False):
        raise KeyboardInterrupt


def _read_h5ad(path: Path) -> AnnData:
    import anndata as ad

    if not path.exists():
        raise CLIError(f"input file {path} does not exist.")
    if not path.is_file():
        raise CLIError(f"input {path} is not a file.")
    try:
        return ad.read_h5ad(path)
    except Exception as err:  # h5py/anndata raise many kinds for unreadable files
        raise CLIError(f"cannot read {path} as .h5ad: {_one_line(err)}") from err


def _write_h5ad(adata: AnnData, path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        adata.write_h5ad(path)
    except Exception as err:
        raise CLIError(f"cannot write {path}: {_one_line(err)}") from err


def read_signatures(path: str | Path, var_names: Sequence[str] | None = None) -> dict:
    """Read marker-gene signatures from a JSON or a two-column CSV/TSV file.

    Parameters
    ----------
    path
        ``.json`` holding ``{name: [genes]}`` (a single gene may be a string), or a table with
        one ``cluster, gene`` pair per line, comma- (``.csv``) or tab-separated (``.tsv``,
        ``.tab``; other suffixes: tab if the first line has one). A header line is optional;
        blank lines and lines starting with ``#`` are skipped.
    var_names
        Genes of the data; a first line whose gene is not among them and that looks like a
        header (``gene``, ``marker``, ``cluster``, ...) is taken as the header.

    Returns
    -------
    ``{name: [genes]}`` in file order (checked against the data later by ``setup_anndata``).

    Raises
    ------
    CLIError
        If the file is missing, unreadable or malformed.
    """
    path = Path(path)
    if path.is_dir():
        raise CLIError(f"signatures file {path} is a folder; give a .json, .csv or .tsv file.")
    if not path.is_file():
        raise CLIError(f"signatures file {path} does not exist.")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise CLIError(f"cannot read signatures file {path}: {_one_line(err)}") from err
    if path.suffix.lower() == ".json" or text.lstrip().startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise CLIError(f"cannot parse signatures file {path} as JSON: {err}") from err
        if not isinstance(data, dict):
            raise CLIError(
                f"signatures file {path} must hold a JSON object {{name: [genes]}}, "
                f"got {type(data).__name__}."
            )
        return data
    return _signatures_from_table(path, text, var_names)


def _signatures_from_table(path: Path, text: str, var_names: Sequence[str] | None) -> dict:
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not lines:
        raise CLIError(f"signatures file {path} is empty.")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        delimiter = ","
    elif suffix in (".tsv", ".tab"):
        delimiter = "\t"
    else:
        delimiter = "\t" if "\t" in lines[0] else ","
    rows = []
    for number, row in enumerate(csv.reader(lines, delimiter=delimiter), start=1):
        fields = [f.strip() for f in row]
        while fields and not fields[-1]:
            fields.pop()
        if len(fields) != 2 or not all(fields):
            raise CLIError(
                f"signatures file {path}, line {number}: expected two columns (cluster, gene) "
                f"separated by {'a tab' if delimiter == chr(9) else 'a comma'}, got {row!r}."
            )
        rows.append(fields)
    known = set(var_names) if var_names is not None else set()
    name0, gene0 = rows[0]
    if gene0 not in known and (gene0.lower() in _HEADER_WORDS or name0.lower() in _HEADER_WORDS):
        rows = rows[1:]
    if not rows:
        raise CLIError(f"signatures file {path} has a header but no (cluster, gene) rows.")
    signatures: dict[str, list[str]] = {}
    for name, gene in rows:
        signatures.setdefault(name, []).append(gene)
    return signatures


def _coerce_category(column, value: str):
    """``--unlabeled-category`` in the type of the labels column (e.g. -1 for integer codes)."""
    import pandas as pd

    values = column.cat.categories if isinstance(column.dtype, pd.CategoricalDtype) else column
    dtype = values.dtype
    if pd.api.types.is_numeric_dtype(dtype) and not pd.api.types.is_bool_dtype(dtype):
        try:
            number = float(value)
        except ValueError:
            return value
        return int(number) if number.is_integer() else number
    return value


def _labelled(column, unlabeled) -> Any:
    """Boolean mask of cells that carry a label."""
    return (column.notna() & (column.astype(object) != unlabeled)).to_numpy()


def _print_clusters(adata: AnnData, cluster_key: str = "moesim_cluster") -> None:
    col = adata.obs[cluster_key]
    counts = col.value_counts(sort=False)
    uns = adata.uns.get("moesim", {})
    n_exp = len(uns.get("cluster_names", counts))
    print(f"clusters ({int((counts > 0).sum())} of {n_exp} experts hold cells):")
    width = max((len(str(c)) for c in counts.index), default=0)
    for name, n in counts.items():
        print(f"  {str(name):<{width}}  {int(n)}")


def _format_report(rep: dict) -> str:
    return ", ".join(f"{k} {rep[k]:.3f}" for k in ("f_measure", "nmi", "ari", "hungarian_f1"))


def _restarts_line(table) -> str:
    """One line on the restarts: each one's similarity loss and clusters, and the one kept."""
    parts = [
        f"{r}: {row.similarity_loss:.4f} ({row.n_clusters} clusters)" for r, row in table.iterrows()
    ]
    kept = int(table.index[table["kept"]][0])
    return f"restarts (similarity loss): {', '.join(parts)}; kept restart {kept}"


def _n_epochs(model) -> int | None:
    hist = getattr(model, "history", None) or {}
    for key in ("elbo_train", "reconstruction_loss_train"):
        if key in hist:
            return len(hist[key])
    return None


def _write_umap_figure(
    adata: AnnData, color: Sequence[str], path: Path, seed: int, latent_key: str = "X_moesim"
) -> None:
    """UMAP of ``obsm[latent_key]`` coloured by each obs column in ``color``, written to path."""
    import anndata as ad
    import numpy as np
    import pandas as pd
    import scanpy as sc
    from matplotlib.figure import Figure

    from scmoesim.pl._utils import scatter_categories

    view = ad.AnnData(
        obs=pd.DataFrame(index=adata.obs_names.copy()),
        obsm={latent_key: np.asarray(adata.obsm[latent_key])},
    )
    sc.pp.neighbors(view, use_rep=latent_key, random_state=seed)
    sc.tl.umap(view, random_state=seed)
    xy = np.asarray(view.obsm["X_umap"])
    fig = Figure(figsize=(6.0 * len(color), 4.5), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(color)))
    for ax, key in zip(axes, color, strict=True):
        col = adata.obs[key]
        cats = [str(c) for c in col.cat.categories] if hasattr(col, "cat") else None
        scatter_categories(ax, xy, col.to_numpy(dtype=object), categories=cats, title=key)
        ax.set_xlabel("UMAP1")
        ax.set_ylabel("UMAP2")
    fig.suptitle(f"UMAP of {latent_key}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
    except Exception as err:
        raise CLIError(f"cannot write {path}: {_one_line(err)}") from err


# ---------------------------------------------------------------------------------------------
# commands
# ---------------------------------------------------------------------------------------------
def _umap_projection(adata: AnnData, args: argparse.Namespace) -> np.ndarray:
    """The paper's UMAP of the data, computed on a scratch AnnData (no other key is written)."""
    import numpy as np
    import scanpy as sc
    from anndata import AnnData
    from scipy import sparse

    from scmoesim import pp
    from scmoesim._constants import COUNT_LIKELIHOODS
    from scmoesim.model import _validate as V

    # setup_anndata's checks (empty data, missing layer or X, dtype, NaN), before PCA and UMAP
    # turn them into less readable errors; setup_anndata runs them again after the projection
    V.check_adata_basics(adata, args.layer)
    x = V.get_matrix(adata, args.layer)
    tmp = AnnData(X=x.astype(np.float32), obs=adata.obs[[]].copy())  # astype copies
    counts = args.likelihood in COUNT_LIKELIHOODS
    if counts:
        sc.pp.normalize_total(tmp, target_sum=1e4)
        sc.pp.log1p(tmp)
    use_rep = "X"
    if counts or tmp.n_vars > 50:
        n_comps = min(50, tmp.n_obs - 1, tmp.n_vars - 1)
        sc.pp.pca(tmp, n_comps=n_comps, random_state=args.seed)
        use_rep = "X_pca"
    elif sparse.issparse(tmp.X):
        tmp.X = tmp.X.toarray()
    pp.umap_embedding(
        tmp,
        n_components=args.umap_components,
        min_dist=args.umap_min_dist,
        use_rep=use_rep,
        random_state=args.seed,
    )
    return np.asarray(tmp.obsm["X_umap"])


def _fit(args: argparse.Namespace) -> int:
    if args.umap and args.embedding_key is not None:
        raise CLIError("give either --umap or --embedding-key, not both.")
    out = Path(args.output)
    model_dir = Path(args.save_model) if args.save_model else None
    _check_output(out, args.force)
    if model_dir is not None:
        _check_output(model_dir, args.force, "model directory ", directory=True)
    adata = _read_h5ad(Path(args.input))

    import scvi

    from scmoesim import MoESim, metrics

    signatures = (
        read_signatures(args.signatures, adata.var_names) if args.signatures is not None else None
    )
    unlabeled: Any = args.unlabeled_category
    if args.labels_key is not None and args.labels_key in adata.obs:
        unlabeled = _coerce_category(adata.obs[args.labels_key], unlabeled)
    print(f"{args.input}: {adata.n_obs} cells x {adata.n_vars} genes")
    embedding_key = args.embedding_key
    if args.umap:
        with _user_errors():
            adata.obsm[_UMAP_KEY] = _umap_projection(adata, args)
        embedding_key = _UMAP_KEY
        print(f"UMAP projection ({args.umap_components}-D) in obsm['{_UMAP_KEY}']")
    with _user_errors():
        MoESim.setup_anndata(
            adata,
            layer=args.layer,
            batch_key=args.batch_key,
            labels_key=args.labels_key,
            unlabeled_category=unlabeled,
            signatures=signatures,
            signature_threshold=args.signature_threshold,
            embedding_key=embedding_key,
        )
    scvi.settings.seed = args.seed
    with _user_errors():
        model = MoESim(
            adata, n_experts=args.n_experts, n_latent=args.n_latent, likelihood=args.likelihood
        )
    print(model._model_summary_string)
    t0 = time.time()
    with _user_errors():
        with _stop_on_interrupt(model):
            model.train(
                max_epochs=args.epochs,
                batch_size=args.batch_size,
                accelerator=args.accelerator,
                enable_progress_bar=not args.quiet,
                n_restarts=args.restarts,
            )
        model.annotate(adata)
    if model.restarts_ is not None:
        print(_restarts_line(model.restarts_))
    n_epochs = _n_epochs(model)
    print(f"trained {n_epochs if n_epochs is not None else '?'} epochs in {time.time() - t0:.1f} s")
    _print_clusters(adata)
    if args.labels_key is not None:
        keep = _labelled(adata.obs[args.labels_key], unlabeled)
        truth = adata.obs[args.labels_key][keep].astype(str)
        pred = adata.obs["moesim_cluster"][keep].astype(str)
        rep = metrics.mean_f1_report(truth, pred)
        print(
            f"agreement with {args.labels_key} on {int(keep.sum())} labelled cells: "
            + _format_report(rep)
            + f"; {rep['n_clusters']} clusters"
        )
    _write_h5ad(adata, out)
    umap_key = f", obsm['{_UMAP_KEY}']" if args.umap else ""
    print(
        f"wrote {out} (obsm['X_moesim'], obs['moesim_cluster'], obsm['moesim_proba'], "
        f"uns['moesim']{umap_key})"
    )
    if model_dir is not None:
        try:
            model.save(str(model_dir), overwrite=args.force)
        except Exception as err:
            raise CLIError(f"cannot save the model to {model_dir}: {_one_line(err)}") from err
        print(f"saved the model to {model_dir} (load with scmoesim.MoESim.load(dir, adata=...))")
    return 0


def _generate(args: argparse.Namespace) -> int:
    out = Path(args.output)
    _check_output(out, args.force)
    model_dir = Path(args.model_dir)
    if not model_dir.is_dir():
        raise CLIError(f"model directory {model_dir} does not exist.")
    if not (model_dir / "model.pt").is_file():
        raise CLIError(
            f"{model_dir} holds no saved model (model.pt); save one with "
            "`scmoesim fit ... --save-model DIR`."
        )
    if args.adata is None and not (model_dir / "adata.h5ad").is_file():
        raise CLIError(
            f"the model in {model_dir} was saved without its AnnData; pass --adata INPUT.h5ad "
            "(the data it was trained on)."
        )
    adata = _read_h5ad(Path(args.adata)) if args.adata is not None else None

    from scmoesim import MoESim

    try:
        with _user_errors(f"cannot load the model from {model_dir}: "):
            model = MoESim.load(str(model_dir), adata=adata, accelerator=args.accelerator)
    except CLIError as err:
        if _UMAP_KEY not in str(err):
            raise
        raise CLIError(
            f"{err} A model fitted with --umap needs the output of `scmoesim fit` as --adata: "
            f"it holds obsm['{_UMAP_KEY}']."
        ) from err
    except Exception as err:  # a damaged model.pt: torch's zip reader, pickle, ...
        raise CLIError(f"cannot load the model from {model_dir}: {_one_line(err)}") from err
    if not model.is_trained_:
        raise CLIError(f"the model in {model_dir} was saved untrained; train it first.")
    with _user_errors():
        generated = model.generate(
            args.n_cells,
            clusters=args.clusters,
            temperature=args.temperature,
            latent=args.latent,
            batch=args.batch,
            seed=args.seed,
            progress_bar=not args.quiet,
        )
    record = generated.uns["moesim_generate"]
    per_cluster = dict(zip(record["clusters"], record["n_cells"], strict=True))
    print(f"generated {generated.n_obs} cells x {generated.n_vars} genes:")
    width = max((len(str(c)) for c in per_cluster), default=0)
    for name, n in per_cluster.items():
        print(f"  {str(name):<{width}}  {n}")
    _write_h5ad(generated, out)
    print(f"wrote {out} (X: samples, layers['mean'], obs['moesim_cluster'])")
    return 0


def _demo(args: argparse.Namespace) -> int:
    import numpy as np
    import scvi

    from scmoesim import MoESim, datasets, metrics

    out = Path(args.output)
    figure = Path(args.figure) if args.figure else out.with_suffix(".png")
    _check_output(out, args.force)
    if not args.no_figure:
        if figure.resolve() == out.resolve():
            raise CLIError(f"the figure and the output are both {out}; give another --figure.")
        _check_output(figure, args.force)
    scvi.settings.seed = args.seed
    adata = datasets.pbmc68k_reduced()
    print(
        f"pbmc68k_reduced: {adata.n_obs} cells x {adata.n_vars} genes; signatures: "
        + ", ".join(f"{k} ({'/'.join(v)})" for k, v in datasets.PBMC_SIGNATURES.items())
    )
    MoESim.setup_anndata(adata, signatures=datasets.PBMC_SIGNATURES)
    model = MoESim(adata, likelihood="normal")
    t0 = time.time()
    with _stop_on_interrupt(model):
        model.train(max_epochs=args.epochs, enable_progress_bar=not args.quiet)
    model.annotate(adata)
    truth = adata.obs["bulk_labels"].astype(str)
    pred = adata.obs["moesim_cluster"].astype(str)
    rep = metrics.mean_f1_report(truth, pred)
    print(f"trained in {time.time() - t0:.1f} s")
    print("agreement with bulk_labels: " + _format_report(rep) + f"; {rep['n_clusters']} clusters")
    print(adata.obs["moesim_cluster"].value_counts().to_string())
    generated = model.generate(200, seed=args.seed)
    adata.uns["moesim_demo"] = {
        "metrics": {k: float(v) for k, v in rep.items()},
        "n_generated": int(generated.n_obs),
        "generated_mean_total": float(np.asarray(generated.X).sum(1).mean()),
    }
    _write_h5ad(adata, out)
    print(f"wrote {out} (obsm['X_moesim'], obs['moesim_cluster'], obsm['moesim_proba'])")
    if not args.no_figure:
        _write_umap_figure(adata, ["moesim_cluster", "bulk_labels"], figure, args.seed)
        print(f"wrote {figure} (UMAP of X_moesim by moesim_cluster and bulk_labels)")
    return 0


# ---------------------------------------------------------------------------------------------
# parser
# ---------------------------------------------------------------------------------------------
def _int_at_least(minimum: int, maximum: int | None = None):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"must be <= {maximum}, got {value}")
        return value

    return parse


#: Seeds numpy accepts (scvi.settings.seed seeds numpy's legacy generator too).
_seed = _int_at_least(0, 2**32 - 1)


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--force", action="store_true", help="overwrite existing outputs")
    p.add_argument("--quiet", action="store_true", help="no progress bars or training logs")


def build_parser() -> argparse.ArgumentParser:
    """Argument parser of the ``scmoesim`` command."""
    parser = argparse.ArgumentParser(
        prog="scmoesim",
        description="MoE-Sim-VAE for single-cell data (AnnData): a similarity-shaped latent "
        "space, a clustering by a gating network and one generator per cluster.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    # ------------------------------------------------------------------ fit
    fit = sub.add_parser(
        "fit",
        help="train MoESim on an .h5ad and write the annotated AnnData",
        description="Register INPUT.h5ad, train MoESim and write the annotated AnnData: "
        "obsm['X_moesim'] (latent space), obs['moesim_cluster'], obsm['moesim_proba'] (gate "
        "probabilities) and uns['moesim']. Prints the clusters and their sizes, and with "
        "--labels-key the F-measure, NMI and ARI against the labelled cells.",
        epilog="examples: scmoesim fit pbmc.h5ad -o pbmc_moesim.h5ad --layer counts "
        "--signatures markers.json --save-model moesim_model; without labels or markers: "
        "scmoesim fit pbmc.h5ad -o pbmc_moesim.h5ad --layer counts --umap",
    )
    fit.add_argument("input", metavar="INPUT.h5ad", help="input AnnData")
    fit.add_argument(
        "-o", "--output", required=True, metavar="OUTPUT.h5ad", help="annotated AnnData to write"
    )
    setup = fit.add_argument_group("data and similarity sources (setup_anndata)")
    setup.add_argument(
        "--layer",
        default=None,
        help="layer with the data (default: X); raw counts for the count likelihoods",
    )
    setup.add_argument(
        "--batch-key", default=None, help="obs column of a technical batch given to the decoders"
    )
    setup.add_argument(
        "--labels-key",
        default=None,
        help="obs column of (possibly partial) labels: cells sharing a label are similar; "
        "also scored against the clusters",
    )
    setup.add_argument(
        "--unlabeled-category",
        default="unknown",
        metavar="VALUE",
        help="value marking unlabeled cells in --labels-key (default: unknown; NaN always "
        "counts as unlabeled)",
    )
    setup.add_argument(
        "--signatures",
        default=None,
        metavar="FILE",
        help="marker-gene signatures: JSON {name: [genes]}, or a CSV/TSV with one "
        "'cluster,gene' pair per line (header optional)",
    )
    setup.add_argument(
        "--signature-threshold",
        type=float,
        default=0.0,
        metavar="SD",
        help="a cell carries a signature when its mean standardised marker expression is "
        "above this (default: 0)",
    )
    setup.add_argument(
        "--embedding-key",
        default=None,
        help="obsm key (e.g. X_umap from scmoesim.pp.umap_embedding, the paper's choice, or "
        "X_pca) for the unsupervised kNN similarity",
    )
    setup.add_argument(
        "--umap",
        action="store_true",
        help=f"compute the paper's UMAP projection for the kNN similarity and write it to "
        f"obsm['{_UMAP_KEY}'] of the output (with a count likelihood, of the PCA of the "
        "log-normalised counts; else of the data, or of its PCA above 50 features)",
    )
    setup.add_argument(
        "--umap-components",
        type=_int_at_least(2),
        default=2,
        metavar="D",
        help="dimension of --umap's projection (default: 2; 10, with --umap-min-dist 0.1, "
        "suits images and data with many classes)",
    )
    setup.add_argument(
        "--umap-min-dist",
        type=float,
        default=0.5,
        metavar="M",
        help="UMAP's min_dist for --umap (default: 0.5, scanpy's)",
    )
    mdl = fit.add_argument_group("model and training")
    mdl.add_argument(
        "--n-experts",
        type=_int_at_least(1),
        default=None,
        metavar="K",
        help="number of experts = maximal number of clusters (default: number of label "
        f"classes or signatures + 1, else {_UNSUPERVISED_N_EXPERTS})",
    )
    mdl.add_argument(
        "--n-latent", type=_int_at_least(1), default=20, help="latent dimension (default: 20)"
    )
    mdl.add_argument(
        "--likelihood",
        choices=_LIKELIHOODS,
        default="nb",
        help="nb, zinb, poisson (raw counts), normal (log or arcsinh data), bernoulli (data "
        "in [0, 1]) (default: nb)",
    )
    mdl.add_argument(
        "--epochs",
        type=_int_at_least(1),
        default=None,
        help="training epochs (default: scvi-tools' heuristic, 400 for small data)",
    )
    mdl.add_argument(
        "--batch-size", type=_int_at_least(2), default=256, help="minibatch size (default: 256)"
    )
    mdl.add_argument(
        "--accelerator",
        default="auto",
        help="Lightning accelerator: auto (a GPU when present), cpu, gpu, mps (default: auto)",
    )
    mdl.add_argument(
        "--restarts",
        type=_int_at_least(1),
        default=1,
        metavar="N",
        help="train N initialisations and keep the one with the lowest similarity loss "
        "(costs N trainings; default: 1)",
    )
    mdl.add_argument("--seed", type=_seed, default=0, help="random seed (default: 0)")
    fit.add_argument(
        "--save-model",
        default=None,
        metavar="DIR",
        help="also save the trained model to DIR (for `scmoesim generate`)",
    )
    _add_common(fit)
    fit.set_defaults(func=_fit)

    # ------------------------------------------------------------------ generate
    gen = sub.add_parser(
        "generate",
        help="generate new cells with a saved model",
        description="Load a model saved by `scmoesim fit --save-model` and generate new cells: "
        "z drawn around cluster k (from the posteriors of its training cells, a Gaussian "
        "fitted to them, or the prior N(mu_k, T^2 I)) and decoded by the expert of cluster k. "
        "Writes an AnnData with the samples in X, the expected values in layers['mean'] and "
        "obs['moesim_cluster'].",
        epilog="example: scmoesim generate moesim_model --adata pbmc.h5ad --n-cells 500 "
        "--clusters 'CD19+ B' 'CD56+ NK' -o generated.h5ad",
    )
    gen.add_argument("model_dir", metavar="MODEL_DIR", help="directory of the saved model")
    gen.add_argument(
        "--adata",
        default=None,
        metavar="INPUT.h5ad",
        help="the data the model was trained on (same genes and layer; needed unless the model "
        "was saved with its AnnData)",
    )
    gen.add_argument(
        "--n-cells", type=_int_at_least(1), required=True, metavar="N", help="cells to generate"
    )
    gen.add_argument(
        "--clusters",
        nargs="+",
        default=None,
        metavar="NAME",
        help="clusters to generate (default: all that hold training cells); N is split in the "
        "proportions of the training data",
    )
    gen.add_argument(
        "--temperature",
        type=_non_negative_float,
        default=1.0,
        metavar="T",
        help="scale of the latent noise around the cluster centre (default: 1)",
    )
    gen.add_argument(
        "--latent",
        choices=["posterior", "fitted", "prior"],
        default="posterior",
        help="where z comes from: 'posterior' (default), the posterior of a training cell of "
        "the cluster drawn at random; 'fitted', a Gaussian fitted to the cluster's training "
        "cells; 'prior', the paper's N(mu_k, I)",
    )
    gen.add_argument(
        "--batch", default=None, help="batch category to decode with (with a batch key)"
    )
    gen.add_argument("--seed", type=_seed, default=0, help="random seed (default: 0)")
    gen.add_argument(
        "--accelerator", default="auto", help="device to load the model on (default: auto)"
    )
    gen.add_argument(
        "-o", "--output", required=True, metavar="GENERATED.h5ad", help="AnnData to write"
    )
    _add_common(gen)
    gen.set_defaults(func=_generate)

    # ------------------------------------------------------------------ demo
    demo = sub.add_parser(
        "demo",
        help="run the main job on bundled data (pbmc68k_reduced + PBMC signatures)",
        description="Cluster pbmc68k_reduced with PBMC marker signatures, print the agreement "
        "with bulk_labels and write the annotated AnnData and a UMAP figure of X_moesim.",
    )
    demo.add_argument("-o", "--output", default="scmoesim_demo.h5ad", help="output .h5ad")
    demo.add_argument(
        "--figure",
        default=None,
        metavar="PNG",
        help="UMAP figure by cluster and bulk_labels (default: the output with .png)",
    )
    demo.add_argument("--no-figure", action="store_true", help="do not draw the figure")
    demo.add_argument(
        "--epochs", type=_int_at_least(1), default=None, help="training epochs (default: auto)"
    )
    demo.add_argument("--seed", type=_seed, default=0, help="random seed")
    demo.add_argument("--force", action="store_true", help="overwrite the outputs")
    demo.add_argument("--quiet", action="store_true", help="no progress bar")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``scmoesim`` command.

    Returns
    -------
    The exit code: 0 on success, 1 for errors in the input (printed as ``error: ...``), 130
    when interrupted; usage errors exit with 2 (argparse).
    """
    args = build_parser().parse_args(argv)
    with warnings.catch_warnings(), _quiet_logs(getattr(args, "quiet", False)):
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
        warnings.showwarning = _show_warning
        try:
            return args.func(args)
        except CLIError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("error: interrupted", file=sys.stderr)
            return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
