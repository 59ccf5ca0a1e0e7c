"""Step 4: train and evaluate the two-stage recommender (gatekeeper + expert) on shared k folds.

The command is serec.cli.model_recommender_w_scaler (also installed as `serec-train`);
`python model_recommender_w_scaler.py --help` lists its flags and the stages.
"""

import sys

from serec.cli.model_recommender_w_scaler import main

if __name__ == "__main__":
    sys.exit(main())
