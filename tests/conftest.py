"""Shared pytest set-up: quiet megatron's import-time warnings about missing apex/TE."""

import warnings

warnings.filterwarnings("ignore", message=".*Transformer Engine.*")
warnings.filterwarnings("ignore", message=".*Apex.*")
warnings.filterwarnings("ignore", message=".*apex.*")
