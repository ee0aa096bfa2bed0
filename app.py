"""metasae dashboard: ``streamlit run app.py`` (the bundled atlas in data/).

Other atlases: ``streamlit run app.py -- --atlas PATH_OR_HUB_ID[,MORE]`` or ``METASAE_ATLAS=PATH[,MORE]``;
several can be switched in the sidebar. This file is the ASGI entry point Streamlit detects (`st.App`): it
serves the script dashboard.py (which wires the pages) behind `metasae.app_server`'s redirect of too-deep page
addresses, which would otherwise load a blank tab.
"""

from __future__ import annotations

import streamlit as st
from starlette.middleware import Middleware

from metasae.app_server import DeepPathRedirect

app = st.App("dashboard.py", middleware=[Middleware(DeepPathRedirect)])
