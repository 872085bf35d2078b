"""``python -m lafn_lightning.cli``: the same as the ``lafn`` command."""
from . import main

main()
