#!/bin/sh
# Entrypoint of the Flotilla image (deploy/Containerfile).
#
# On cgroup v2 a node creates its machines' cgroups under the root of its cgroup namespace and
# enables the memory, pids and cpu controllers there. In a container with a cgroup namespace of
# its own, that root is the container's cgroup, and the kernel refuses to enable controllers
# for the children of a cgroup that holds processes ("no internal processes"), except at the
# real root. So every process of the container moves first into a leaf, /sys/fs/cgroup/init,
# as container engines' own in-container runtimes do. On cgroup v1 nothing needs moving.
set -eu

if [ -f /sys/fs/cgroup/cgroup.controllers ] && [ -w /sys/fs/cgroup ]; then
    mkdir -p /sys/fs/cgroup/init
    while read -r process; do
        echo "$process" > /sys/fs/cgroup/init/cgroup.procs 2>/dev/null || true
    done < /sys/fs/cgroup/cgroup.procs
fi

exec "$@"
