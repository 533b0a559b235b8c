# Sourced by deploy/local's scripts: whether the pid in a pid file is still
# the process we started. A pid file outlives its process, and after a reboot
# or a restore of this machine its pid may belong to any other process (even
# one of our other servers). Signalling that pid would stop a process we did
# not start, and trusting it would leave our server down.

# The program pid $1 runs (its executable's name), or nothing if it is gone
# or a zombie.
program_of() { local exe; exe=$(readlink "/proc/$1/exe" 2>/dev/null) || return 0; exe=${exe% (deleted)}; echo "${exe##*/}"; }

# still_ours PIDFILE PROGRAM [ARG]: the pid on PIDFILE's first line is live, runs
# PROGRAM, and has ARG (a JVM's main class, say) among its arguments.
still_ours() {
  local p
  [ -s "$1" ] || return 1
  p=$(head -1 "$1")
  [[ "$p" =~ ^[0-9]+$ ]] && [ "$(program_of "$p")" = "$2" ] || return 1
  [ -z "${3:-}" ] || tr '\0' '\n' <"/proc/$p/cmdline" 2>/dev/null | grep -qxF -- "$3"
}

# started PID: a server this script has just started (its own child, so the
# pid cannot have been reused) is still live and not a zombie, whatever it
# runs. Not still_ours: until its exec chain (setsid, bash -c exec) ends, the
# child does not run its program yet.
started() { [ -n "$(program_of "$1")" ]; }
