"""What each dashboard page shows, computed from an opened atlas without Streamlit (so it is unit-tested).

Pages call these functions, then draw the results with ``metasae.plots`` and a few Streamlit widgets. Every
function answers from the atlas's in-memory indexes (``metasae.atlas``) and ``metasae.search``: a page rerun
costs milliseconds, even at paper scale. Import from the module that holds a name:

- ``text``: tokens and numbers as plain text (``show_token``, ``fmt``, ``number``, ``latent_name``)
- ``render``: HTML snippets (token chips, shaded examples) and tables for display and download
- ``badges``: dead / dense flags and their thresholds
- ``overview``, ``latent``, ``meta_latent``, ``search``, ``stitching``, ``live``: one page's view models

Not views, so kept elsewhere: backend discovery and warm start (``metasae.app_state``), the atlas's torch
weights (``metasae.weights``).
"""
