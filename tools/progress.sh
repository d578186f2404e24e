# Progress output for the test command and the setup/build scripts it runs (sourced, not run).
#
# Why: a newcomer watching `bash tools/test.sh` should never stare at a silent terminal for a minute.  Every
# phase says what it does and how long it usually takes, and ends with its elapsed time; long quiet commands
# (apt, pip, debootstrap) write their full output to a log file, print a heartbeat at least every
# VIRTLET_HEARTBEAT seconds (default 30), and print the log's tail when they fail.
#
#   phase "what it does" "usually ~1 min"   ... phase_end
#   quiet LABEL LOGFILE CMD...              runs CMD with its stdout+stderr in LOGFILE (heartbeat, tail on error)

_phase_name=""
_phase_start=0

_elapsed() {  # _elapsed SECONDS: "42 s" or "3 min 05 s"
  local s=$1
  if ((s >= 60)); then printf '%d min %02d s' $((s / 60)) $((s % 60)); else printf '%d s' "$s"; fi
}

phase() {  # phase NAME [HOW-LONG-IT-USUALLY-TAKES]
  _phase_name=$1
  _phase_start=$(date +%s)
  echo "== $1${2:+ ($2)}"
}

phase_end() {
  [ -n "$_phase_name" ] || return 0
  echo "   done: $_phase_name in $(_elapsed $(($(date +%s) - _phase_start)))"
  _phase_name=""
}

phase_stopped() {  # the phase that was running when the command failed
  [ -n "$_phase_name" ] || return 0
  echo "   FAILED during: $_phase_name, after $(_elapsed $(($(date +%s) - _phase_start)))"
  _phase_name=""
}

quiet() {  # quiet LABEL LOGFILE CMD...: returns CMD's exit status
  local label=$1 logfile=$2 start pid rc=0 beat=${VIRTLET_HEARTBEAT:-30} waited
  shift 2
  mkdir -p "$(dirname "$logfile")"
  start=$(date +%s)
  "$@" >"$logfile" 2>&1 &
  pid=$!
  while true; do
    waited=0
    while ((waited < beat)) && kill -0 "$pid" 2>/dev/null; do
      sleep 1
      waited=$((waited + 1))
    done
    kill -0 "$pid" 2>/dev/null || break
    echo "   ... $label: still running, $(_elapsed $(($(date +%s) - start))) so far (log: $logfile)" >&2
  done
  wait "$pid" || rc=$?
  if [ "$rc" != 0 ]; then
    echo "   FAILED: $label (exit $rc) after $(_elapsed $(($(date +%s) - start))); last lines of $logfile:" >&2
    tail -n 40 "$logfile" | sed 's/^/   | /' >&2
  fi
  return "$rc"
}
