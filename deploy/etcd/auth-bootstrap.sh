#!/usr/bin/env bash
# Bootstrap etcd authentication for the control plane's kvstore mode.
#
# Creates the `root` user and role, one role and one user per control-plane component with
# least privilege on the key prefix, then enables auth. Safe to run again: every step checks
# before it changes anything, and once auth is on the script authenticates as root. It prints
# one line per step and never prints a password.
#
#   role / user   permissions (PREFIX defaults to cp/)
#   cp-agent      readwrite on the prefix PREFIXstate/ (nodes, endpoints, identity
#                 references, IP leases); read on the key PREFIX.heartbeat
#   cp-operator   readwrite on the prefix PREFIX (heartbeat, leader election, GC, CIDRs)
#   cp-readonly   read on the prefix PREFIX (for cpctl)
#
# Environment:
#   ETCDCTL_ENDPOINTS                 client URLs, comma-separated (required)
#   ETCDCTL_CACERT, ETCDCTL_CERT, ETCDCTL_KEY
#                                     TLS files, read by etcdctl itself
#   CP_KVSTORE_PREFIX                 key prefix (default cp/)
#   CP_ETCD_ROOT_PASSWORD[_FILE]      root's password (always needed)
#   CP_ETCD_AGENT_PASSWORD[_FILE]     cp-agent's password      } needed only when the
#   CP_ETCD_OPERATOR_PASSWORD[_FILE]  cp-operator's password   } user does not exist yet;
#   CP_ETCD_READONLY_PASSWORD[_FILE]  cp-readonly's password   } an existing one is kept
#   CP_ETCD_WAIT_SECONDS              how long to wait for etcd to answer (default 60)
#   CP_ETCD_COMMAND_TIMEOUT           seconds one etcdctl command may take (default 20)
#
# Each password comes from the variable or from the file the _FILE variable names (leading and
# trailing whitespace stripped, as the kvstore config's password-file is read). Passwords must
# not contain whitespace: they reach etcdctl on its standard input (never on a command line,
# where `ps` would show them) and etcdctl reads one word from there.
#
# Works with etcdctl 3.4 and 3.5. Exit status: 0 done, 1 failure.
set -euo pipefail

export ETCDCTL_API=3 LC_ALL=C
# The script chooses the identity of every request itself.
unset ETCDCTL_USER ETCDCTL_PASSWORD

log() { printf '%s\n' "$*"; }
die() {
	printf 'auth-bootstrap: %s\n' "$*" >&2
	exit 1
}

command -v etcdctl >/dev/null || die "etcdctl not found on PATH"
[[ -n ${ETCDCTL_ENDPOINTS:-} ]] || die "set ETCDCTL_ENDPOINTS (comma-separated client URLs)"

PREFIX=${CP_KVSTORE_PREFIX:-cp/}
[[ $PREFIX =~ ^[[:graph:]]+$ && $PREFIX != / ]] ||
	die "CP_KVSTORE_PREFIX must be printable ASCII without spaces, and not '/'"
[[ $PREFIX == */ ]] || PREFIX="$PREFIX/"

WAIT_SECONDS=${CP_ETCD_WAIT_SECONDS:-60}
COMMAND_TIMEOUT=${CP_ETCD_COMMAND_TIMEOUT:-20}
[[ $WAIT_SECONDS =~ ^[0-9]+$ && $COMMAND_TIMEOUT =~ ^[1-9][0-9]*$ ]] ||
	die "CP_ETCD_WAIT_SECONDS and CP_ETCD_COMMAND_TIMEOUT must be whole numbers of seconds"
# etcdctl's own deadlines are shorter (dial 2 s, which also bounds the login with --user:
# bcrypt and a raft round on a busy etcd; command 5 s): let the command take its time.
export ETCDCTL_DIAL_TIMEOUT=${ETCDCTL_DIAL_TIMEOUT:-${COMMAND_TIMEOUT}s}
export ETCDCTL_COMMAND_TIMEOUT=${ETCDCTL_COMMAND_TIMEOUT:-${COMMAND_TIMEOUT}s}

ERRFILE=$(mktemp)
trap 'rm -f "$ERRFILE"' EXIT
CHANGES=0

# The last line etcdctl wrote to stderr ("Error: etcdserver: ...").
last_error() { tail -n 1 "$ERRFILE" 2>/dev/null || true; }

# etcdctl 3.4 sends the user and role requests without a deadline: against a cluster that
# does not answer they would wait forever. Bound every command (when coreutils is there).
run_etcdctl() {
	local rc=0
	if command -v timeout >/dev/null; then
		timeout -k 5 "$COMMAND_TIMEOUT" etcdctl "$@" || rc=$?
	else
		etcdctl "$@" || rc=$?
	fi
	if ((rc == 124 || rc == 137)); then
		printf 'Error: no answer within %ss\n' "$COMMAND_TIMEOUT" >&2
	fi
	return "$rc"
}

# Run etcdctl; print its stdout; stop the script with etcdctl's error when it fails.
ctl() {
	run_etcdctl "$@" 2>"$ERRFILE" || die "etcdctl $1 ${2:-} failed: $(last_error)"
}

# read_password STEM VAR: set VAR from $STEM_PASSWORD or the file $STEM_PASSWORD_FILE.
read_password() {
	local stem=$1 var=$2 env_name="$1_PASSWORD" file_name="$1_PASSWORD_FILE" value
	if [[ -n ${!env_name:-} && -n ${!file_name:-} ]]; then
		die "set $env_name or $file_name, not both"
	elif [[ -n ${!file_name:-} ]]; then
		[[ -f ${!file_name} && -r ${!file_name} ]] || die "$file_name: cannot read ${!file_name}"
		value=$(<"${!file_name}")
		value=${value#"${value%%[![:space:]]*}"}
		value=${value%"${value##*[![:space:]]}"}
	elif [[ -n ${!env_name:-} ]]; then
		value=${!env_name}
	else
		die "no password given for $stem: set $env_name or $file_name"
	fi
	[[ -n $value ]] || die "$stem: the password is empty"
	[[ $value != *[[:space:]]* ]] || die "$stem: the password must not contain whitespace"
	printf -v "$var" '%s' "$value"
}

# 0 when auth is enabled, 1 when not; waits up to WAIT_SECONDS for etcd to answer.
# A read as a user that does not exist tells, the same way with etcdctl and etcd 3.4 and 3.5:
# with auth off the client ignores "authentication is not enabled" and reads anonymously; with
# auth on, logging in fails. (`etcdctl auth status` exists only from 3.5, and an anonymous
# request is not anonymous when the client certificate's CN names an etcd user.)
auth_enabled() {
	local deadline=$((SECONDS + WAIT_SECONDS))
	while :; do
		# (a shorter dial than the commands': an etcd still starting is probed again soon)
		if ETCDCTL_USER=cp-auth-bootstrap-probe ETCDCTL_PASSWORD=none ETCDCTL_DIAL_TIMEOUT=5s \
			run_etcdctl get --keys-only "${PREFIX}.heartbeat" >/dev/null 2>"$ERRFILE"; then
			return 1
		fi
		case $(last_error) in *"authentication failed"*) return 0 ;; esac
		((SECONDS < deadline)) || die "etcd at $ETCDCTL_ENDPOINTS does not answer: $(last_error)"
		sleep 2
	done
}

# (Capture first: `grep -q` in a pipeline could end etcdctl early and, with pipefail, fail.)
user_exists() {
	local names
	names=$(ctl user list) || exit 1
	grep -qxF -- "$1" <<<"$names"
}
role_exists() {
	local names
	names=$(ctl role list) || exit 1
	grep -qxF -- "$1" <<<"$names"
}

# ensure_user NAME PASSWORD_STEM
ensure_user() {
	local name=$1 stem=$2 password
	if user_exists "$name"; then
		log "user $name: exists (password unchanged)"
		return
	fi
	read_password "$stem" password
	printf '%s\n' "$password" | ctl user add "$name" --interactive=false >/dev/null
	log "user $name: created"
	CHANGES=$((CHANGES + 1))
}

ensure_role() {
	if role_exists "$1"; then
		log "role $1: exists"
	else
		ctl role add "$1" >/dev/null
		log "role $1: created"
		CHANGES=$((CHANGES + 1))
	fi
}

# ensure_user_role USER ROLE: grant ROLE; warn about any other role USER has.
ensure_user_role() {
	local user=$1 role=$2 roles r
	roles=$(ctl user get "$user" | sed -n 's/^Roles://p')
	if [[ " $roles " == *" $role "* ]]; then
		log "user $user: has role $role"
	else
		ctl user grant-role "$user" "$role" >/dev/null
		log "user $user: granted role $role"
		CHANGES=$((CHANGES + 1))
	fi
	for r in $roles; do
		[[ $r == "$role" ]] || log "user $user: WARNING: also has role $r (left alone)" >&2
	done
}

# The line `etcdctl role get` prints for a single key or a prefix range (3.4 and 3.5 agree).
perm_line() {
	if [[ $1 == prefix ]]; then
		local last=${2: -1} end
		printf -v end '%s%b' "${2%?}" "\\x$(printf '%02x' $(($(printf '%d' "'$last") + 1)))"
		printf '\t[%s, %s) (prefix %s)' "$2" "$end" "$2"
	else
		printf '\t%s' "$2"
	fi
}

# ensure_perms ROLE "TYPE KIND KEY"...: TYPE read|readwrite, KIND key|prefix. Grants what is
# missing, narrows a readwrite that should be read, and warns about permissions not listed.
ensure_perms() {
	local role=$1 spec type kind key line current reads writes expected="" extra
	shift
	current=$(ctl role get "$role")
	reads=$(awk '/^KV Read:/ {s = 1; next} /^KV Write:/ {s = 2; next} s == 1' <<<"$current")
	writes=$(awk '/^KV Write:/ {s = 1; next} s == 1' <<<"$current")
	for spec in "$@"; do
		read -r type kind key <<<"$spec"
		line=$(perm_line "$kind" "$key")
		expected+="$line"$'\n'
		local want_write=false has_read=false has_write=false
		[[ $type == readwrite ]] && want_write=true
		grep -qxF -- "$line" <<<"$reads" && has_read=true
		grep -qxF -- "$line" <<<"$writes" && has_write=true
		local flags=()
		[[ $kind == prefix ]] && flags=(--prefix=true)
		if [[ $has_read == true && $has_write == "$want_write" ]]; then
			log "role $role: has $type on $kind $key"
		else
			ctl role grant-permission "${flags[@]}" "$role" "$type" "$key" >/dev/null
			if [[ $has_write == true ]]; then
				log "role $role: narrowed to $type on $kind $key"
			else
				log "role $role: granted $type on $kind $key"
			fi
			CHANGES=$((CHANGES + 1))
		fi
	done
	while IFS= read -r extra; do
		[[ -z $extra ]] || grep -qxF -- "$extra" <<<"$expected" ||
			log "role $role: WARNING: unexpected permission${extra/$'\t'/ } (left alone)" >&2
	done < <(printf '%s\n%s\n' "$reads" "$writes" | sort -u)
}

read_password CP_ETCD_ROOT ROOT_PASSWORD

if auth_enabled; then
	AUTH_WAS_ENABLED=true
	export ETCDCTL_USER=root ETCDCTL_PASSWORD="$ROOT_PASSWORD"
	run_etcdctl user get root >/dev/null 2>"$ERRFILE" ||
		die "auth is enabled but root cannot log in: $(last_error)"
	log "auth: enabled; authenticated as root"
else
	AUTH_WAS_ENABLED=false
	log "auth: disabled; configuring before enabling it"
fi

ensure_user root CP_ETCD_ROOT
ensure_role root
ensure_user_role root root

ensure_role cp-agent
ensure_perms cp-agent "readwrite prefix ${PREFIX}state/" "read key ${PREFIX}.heartbeat"
ensure_role cp-operator
ensure_perms cp-operator "readwrite prefix ${PREFIX}"
ensure_role cp-readonly
ensure_perms cp-readonly "read prefix ${PREFIX}"

ensure_user cp-agent CP_ETCD_AGENT
ensure_user_role cp-agent cp-agent
ensure_user cp-operator CP_ETCD_OPERATOR
ensure_user_role cp-operator cp-operator
ensure_user cp-readonly CP_ETCD_READONLY
ensure_user_role cp-readonly cp-readonly

if [[ $AUTH_WAS_ENABLED == true ]]; then
	log "auth: already enabled"
else
	ctl auth enable >/dev/null
	log "auth: enabled"
	CHANGES=$((CHANGES + 1))
fi
log "done: $CHANGES change(s)"
