"""Step 2: run every SE model on every noisy file, score the outputs, label each file's best model.

The command is serec.cli.enhancement_driver (also installed as `serec-enhance`);
`python enhancement_driver.py --help` lists its flags.
"""

import sys

from serec.cli.enhancement_driver import main

if __name__ == "__main__":
    sys.exit(main())
