"""RecBole's run_recbole.py with latent user profiles: add --uip=true.

    python run_recbole_uip.py --model=DeepFM --dataset=ml-100k --uip=true
"""

import sys

from recbole_uip.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
