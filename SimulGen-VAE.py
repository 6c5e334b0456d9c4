"""SimulGenVAE: hierarchical-VAE surrogates of transient simulations.

    python SimulGen-VAE.py --preset=1 --plot=1 --lc_only=0 --size=small --load_all=1
    python SimulGen-VAE.py --help
"""
import sys

from modules.cli import main

if __name__ == "__main__":
    sys.exit(main())
