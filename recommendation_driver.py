"""Step 5: route new recordings to their recommended model, enhance, evaluate, compare, report.

The command is serec.cli.recommendation_driver (also installed as `serec-recommend`);
`python recommendation_driver.py --help` lists its flags.
"""

import sys

from serec.cli.recommendation_driver import main

if __name__ == "__main__":
    sys.exit(main())
