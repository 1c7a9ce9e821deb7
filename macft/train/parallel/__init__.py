"""Several Macs: ranks and collectives over mx.distributed (world.py), the run folder as the
other ranks see it (peer_run.py), the launch through mlx.launch (hosts.py), and the watchdog
for a peer that stops answering (watchdog.py)."""
