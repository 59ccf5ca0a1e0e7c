"""Step 1: mix clean speech with noise at target active-speech SNRs (noisy/clean pairs + metadata).

The command is serec.cli.speech_noise_mixing (also installed as `serec-mix`);
`python preprocessing/speech_noise_mixing.py --help` lists its flags.
"""

import sys

from serec.cli.speech_noise_mixing import main

if __name__ == "__main__":
    sys.exit(main())
