"""`sidecar-executor worker`: the same executor and pools as `serve`, fed by a Remote Workers API
scheduler (BuildGrid) instead of REAPI clients. The bot takes leases over Bots, fetches each
action's content from the scheduler's CAS into the local disk CAS, runs it, uploads the outputs
and completes the lease."""
