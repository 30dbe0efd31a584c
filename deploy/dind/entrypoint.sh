#!/bin/sh
# Prepares the container for a nested Docker daemon, then runs exactly the command given
# (`dockerd ...`): it never adds a listener or any other argument.
set -eu
# Sidecars' bind mounts under the exec root must propagate inside this container.
mount --make-rshared / 2>/dev/null || true
# On cgroup v2 the daemon needs controllers enabled for its children, which a cgroup with
# processes in it cannot have: move this container's processes into a child cgroup first.
if [ -f /sys/fs/cgroup/cgroup.controllers ] && mkdir -p /sys/fs/cgroup/init 2>/dev/null; then
  for _ in 1 2 3 4 5; do
    xargs -rn1 </sys/fs/cgroup/cgroup.procs >/sys/fs/cgroup/init/cgroup.procs 2>/dev/null && break
  done
  sed -e 's/ / +/g' -e 's/^/+/' </sys/fs/cgroup/cgroup.controllers \
    >/sys/fs/cgroup/cgroup.subtree_control 2>/dev/null || true
fi
exec "$@"
