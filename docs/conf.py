"""Sphinx configuration of the scmoesim documentation (Sphinx + MyST-NB, furo theme)."""

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version

project = "scmoesim"
author = "scmoesim developers"
copyright = "2026, scmoesim developers"  # noqa: A001
try:
    release = _version("scmoesim")
except PackageNotFoundError:  # pragma: no cover - building from a plain source tree
    release = "0.0.0"

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "sphinx_copybutton",
]

# Notebooks are committed with the outputs of a full run; the docs never execute them (the test
# suite runs them separately with small settings).
nb_execution_mode = "off"
nb_output_stderr = "remove"
nb_merge_streams = True
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3
# .rst first: autosummary writes its generated pages with the first suffix.
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "**.ipynb_checkpoints", "jupyter_execute"]
templates_path = ["_templates"]

autosummary_generate = True
autosummary_imported_members = False
autosummary_ignore_module_all = False
autodoc_default_options = {"members": True, "show-inheritance": False}
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented"
autoclass_content = "class"
napoleon_numpy_docstring = True
napoleon_google_docstring = False
napoleon_use_rtype = False
napoleon_use_param = True
napoleon_custom_sections = [("Functions", "params_style"), ("Sources", "params_style")]

html_theme = "furo"
html_title = "scmoesim"
html_static_path: list[str] = []
