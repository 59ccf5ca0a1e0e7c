"""Step 3: per-file feature vectors (CE/KL, or cekl_plus) for a folder of noisy recordings.

The command is serec.cli.preprocess_features (also installed as `serec-features`);
`python preprocess_features.py --help` lists its flags.
"""

import sys

from serec.cli.preprocess_features import main

if __name__ == "__main__":
    sys.exit(main())
