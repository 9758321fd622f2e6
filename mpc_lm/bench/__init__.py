"""``mpc-lm bench``: one task, several modes, one table, one JSON file, one chart.

Modes (docs/bench.md):

``plaintext``      ordinary PyTorch fine-tuning and inference (a trusted curator sees everything)
``dp``             the same fine-tuning with Opacus DP-SGD at a target epsilon
``mpc``            mpc_lm: the model under secret sharing (2 parties + dealer, or a given consortium)
``crypten-naive``  the same MPC run with CrypTen's stock functions (``approx.mode: crypten``)

Modules: :mod:`.tasks` (models and data), :mod:`.plain` (plaintext and DP,
run in a worker process so memory is measured per mode), :mod:`.secure` (the
MPC modes through :func:`mpc_lm.launch.launch`), :mod:`.netmodel` (LAN/WAN
time model), :mod:`.schema` (the JSON schema), :mod:`.output` (table and
chart), :mod:`.runner` (the orchestration) and :mod:`.cli` (arguments).
"""

MODES = ("plaintext", "dp", "mpc", "crypten-naive")
