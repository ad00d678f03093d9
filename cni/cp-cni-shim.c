/*
 * cp-cni: the CNI plugin binary on the node (a static launcher; no Python on the host).
 *
 * The container runtime runs it with the CNI_* environment and the network configuration
 * (JSON) on stdin. It forwards both to the agent's local API, POST /v1/cni on the unix
 * socket named by the configuration's "agentSocket" (default /var/run/cp/agent.sock), as
 *   {"env": {"CNI_COMMAND": ..., ...}, "stdin": "<the configuration>"}
 * The agent runs the plugin (controlplane.cni.main) with exactly that and answers with its
 * stdout as the body and its exit status in the Cni-Exit-Code header; both are relayed.
 * Answered here without the agent: VERSION, --help, a configuration that is not UTF-8
 * (error 5) or not a JSON object (6), an unknown CNI_COMMAND (4). No agent (or an
 * unusable answer): a CNI error on stdout (11 "try again later" when it cannot be
 * reached) and exit status 1.
 *
 * Build: cc -O2 -Wall -Wextra -Werror -static -o cp-cni cp-cni-shim.c (cni/Makefile).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define DEFAULT_SOCKET "/var/run/cp/agent.sock"
#define MAX_STDIN (256 * 1024)
#define MAX_BODY (1024 * 1024)   /* the agent's limit of a request body */
#define MAX_RESPONSE (1024 * 1024)
#define TIMEOUT_MS 90000         /* the whole exchange; the agent bounds a run at 60 s */
#define MAX_DEPTH 64

#define E_INVALID_ENV 4
#define E_IO 5
#define E_DECODE 6
#define E_INVALID_CONFIG 7
#define E_TRY_AGAIN 11
#define E_INTERNAL 999

static const char USAGE[] =
    "usage: cp-cni (run by the container runtime: CNI_COMMAND=ADD|DEL|CHECK|VERSION and the\n"
    "CNI_* variables in the environment, the network configuration as JSON on stdin)\n"
    "\n"
    "The node's launcher of the control plane's CNI plugin (CNI spec 1.0; results also in\n"
    "0.4.0 form): it hands the request to the cp agent on this node, which runs the plugin\n"
    "(controlplane.cni) through the agent's local API socket (POST /v1/cni), and relays\n"
    "the answer.\n"
    "Configuration fields besides cniVersion, name and type:\n"
    "  agentSocket  the agent's local API socket        (default /var/run/cp/agent.sock)\n"
    "  pinDir       where the datapath maps are pinned  (default /sys/fs/bpf/cp)\n"
    "  mtu          MTU of both veth ends               (default: the kernel's)\n"
    "  labels       endpoint labels, e.g. [\"k8s:app=web\"]\n"
    "  bpfObject    the datapath object (default: the one packaged with the agent)\n"
    "Any failure prints a CNI error {\"cniVersion\", \"code\", \"msg\", \"details\"} and exits 1;\n"
    "no agent on the socket is error 11 (try again later).\n"
    "Installed by `cp-cni install` (the agent image's init container; docs/install.md).\n";

static char in_buf[MAX_STDIN + 1];
static char body[MAX_BODY];
static char resp[MAX_RESPONSE + 1];

/* ---- output ------------------------------------------------------------------------ */

struct out {
	char *p;
	size_t len, cap;
	int overflow;
};

static void put(struct out *o, const char *s, size_t n)
{
	if (o->overflow || n > o->cap - o->len) {
		o->overflow = 1;
		return;
	}
	memcpy(o->p + o->len, s, n);
	o->len += n;
}

static void puts_(struct out *o, const char *s) { put(o, s, strlen(s)); }

/* a JSON string literal; bytes >= 0x80 pass through (UTF-8 stays UTF-8) */
static void put_json_string(struct out *o, const char *s, size_t n)
{
	put(o, "\"", 1);
	for (size_t i = 0; i < n; i++) {
		unsigned char c = (unsigned char)s[i];
		char esc[8];
		if (c == '"' || c == '\\') {
			esc[0] = '\\';
			esc[1] = (char)c;
			put(o, esc, 2);
		} else if (c < 0x20 || c == 0x7f) {
			snprintf(esc, sizeof esc, "\\u%04x", c);
			put(o, esc, 6);
		} else {
			put(o, (const char *)&s[i], 1);
		}
	}
	put(o, "\"", 1);
}

static void write_all(int fd, const char *p, size_t n)
{
	while (n > 0) {
		ssize_t w = write(fd, p, n);
		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0)
			return;
		p += w;
		n -= (size_t)w;
	}
}

static const char *error_version = "1.0.0";

/* prints a CNI error on stdout; returns the exit status 1 */
static int cni_error(int code, const char *msg, const char *fmt, ...)
{
	char details[1024], line[4096], num[16];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(details, sizeof details, fmt, ap);
	va_end(ap);
	struct out o = {line, 0, sizeof line - 1, 0};
	puts_(&o, "{\"cniVersion\": ");
	put_json_string(&o, error_version, strlen(error_version));
	snprintf(num, sizeof num, "%d", code);
	puts_(&o, ", \"code\": ");
	puts_(&o, num);
	puts_(&o, ", \"msg\": ");
	put_json_string(&o, msg, strlen(msg));
	puts_(&o, ", \"details\": ");
	put_json_string(&o, details, strlen(details));
	puts_(&o, "}\n");
	write_all(1, line, o.len);
	return 1;
}

/* ---- a JSON validator that keeps two top-level string fields ----------------------- */

struct field {
	const char *key;
	char val[128];
	int seen;      /* the key is present */
	int is_string; /* ... with a string value that fit into val */
};

struct json {
	const char *s;
	size_t n, i;
	int depth;
	struct field *fields;
	size_t nfields;
};

static void ws(struct json *j)
{
	while (j->i < j->n && strchr(" \t\r\n", j->s[j->i]) && j->s[j->i])
		j->i++;
}

static int hex4(struct json *j, unsigned *v)
{
	*v = 0;
	if (j->n - j->i < 4)
		return -1;
	for (int k = 0; k < 4; k++) {
		char c = j->s[j->i++];
		unsigned d = (c >= '0' && c <= '9')   ? (unsigned)(c - '0')
			     : (c >= 'a' && c <= 'f') ? (unsigned)(c - 'a' + 10)
			     : (c >= 'A' && c <= 'F') ? (unsigned)(c - 'A' + 10)
						      : 16u;
		if (d > 15)
			return -1;
		*v = *v * 16 + d;
	}
	return 0;
}

/* a string at j->i (the opening quote); decoded into out (NUL-terminated) when out is
 * not NULL; *fit is cleared when it did not fit */
static int string(struct json *j, char *out, size_t cap, int *fit)
{
	size_t o = 0;
	if (j->i >= j->n || j->s[j->i] != '"')
		return -1;
	j->i++;
	for (;;) {
		if (j->i >= j->n)
			return -1;
		unsigned char c = (unsigned char)j->s[j->i++];
		char enc[4];
		size_t len = 1;
		if (c == '"')
			break;
		if (c < 0x20)
			return -1;
		enc[0] = (char)c;
		if (c == '\\') {
			if (j->i >= j->n)
				return -1;
			char e = j->s[j->i++];
			const char *from = "\"\\/bfnrt", *to = "\"\\/\b\f\n\r\t";
			const char *at = e ? strchr(from, e) : NULL;
			if (at) {
				enc[0] = to[at - from];
			} else if (e == 'u') {
				unsigned v, lo;
				if (hex4(j, &v))
					return -1;
				size_t at_low = j->i;
				if (v >= 0xd800 && v < 0xdc00 && j->n - j->i >= 6 &&
				    j->s[j->i] == '\\' && j->s[j->i + 1] == 'u') { /* a pair? */
					j->i += 2;
					if (hex4(j, &lo))
						return -1;
					if (lo >= 0xdc00 && lo <= 0xdfff)
						v = 0x10000 + ((v - 0xd800) << 10) + (lo - 0xdc00);
					else
						j->i = at_low;
				}
				if (v >= 0xd800 && v <= 0xdfff) /* a lone surrogate (JSON allows) */
					v = 0xfffd;
				if (v < 0x80) {
					enc[0] = (char)v;
				} else if (v < 0x800) {
					enc[0] = (char)(0xc0 | (v >> 6));
					enc[1] = (char)(0x80 | (v & 0x3f));
					len = 2;
				} else if (v < 0x10000) {
					enc[0] = (char)(0xe0 | (v >> 12));
					enc[1] = (char)(0x80 | ((v >> 6) & 0x3f));
					enc[2] = (char)(0x80 | (v & 0x3f));
					len = 3;
				} else {
					enc[0] = (char)(0xf0 | (v >> 18));
					enc[1] = (char)(0x80 | ((v >> 12) & 0x3f));
					enc[2] = (char)(0x80 | ((v >> 6) & 0x3f));
					enc[3] = (char)(0x80 | (v & 0x3f));
					len = 4;
				}
			} else {
				return -1;
			}
		}
		if (out) {
			if (cap - o <= len) {
				*fit = 0;
				out = NULL;
			} else {
				memcpy(out + o, enc, len);
				o += len;
				out[o] = '\0';
			}
		}
	}
	return 0;
}

static int digits(struct json *j)
{
	size_t start = j->i;
	while (j->i < j->n && j->s[j->i] >= '0' && j->s[j->i] <= '9')
		j->i++;
	return j->i > start ? 0 : -1;
}

static int number(struct json *j)
{
	if (j->i < j->n && j->s[j->i] == '-')
		j->i++;
	if (j->i < j->n && j->s[j->i] == '0')
		j->i++;
	else if (digits(j))
		return -1;
	if (j->i < j->n && j->s[j->i] == '.') {
		j->i++;
		if (digits(j))
			return -1;
	}
	if (j->i < j->n && (j->s[j->i] == 'e' || j->s[j->i] == 'E')) {
		j->i++;
		if (j->i < j->n && (j->s[j->i] == '+' || j->s[j->i] == '-'))
			j->i++;
		if (digits(j))
			return -1;
	}
	return 0;
}

static int value(struct json *j, struct field *keep);

static int container(struct json *j, char open)
{
	char close = open == '{' ? '}' : ']';
	int top = j->depth == 0;
	if (++j->depth > MAX_DEPTH)
		return -1;
	j->i++;
	ws(j);
	if (j->i < j->n && j->s[j->i] == close) {
		j->i++;
		j->depth--;
		return 0;
	}
	for (;;) {
		struct field *keep = NULL;
		ws(j);
		if (open == '{') {
			char key[32] = "";
			int fit = 1;
			if (string(j, key, sizeof key, &fit))
				return -1;
			for (size_t k = 0; top && fit && k < j->nfields; k++)
				if (strcmp(key, j->fields[k].key) == 0)
					keep = &j->fields[k];
			ws(j);
			if (j->i >= j->n || j->s[j->i++] != ':')
				return -1;
			ws(j);
		}
		if (value(j, keep))
			return -1;
		ws(j);
		if (j->i >= j->n)
			return -1;
		char c = j->s[j->i++];
		if (c == close)
			break;
		if (c != ',')
			return -1;
	}
	j->depth--;
	return 0;
}

static int value(struct json *j, struct field *keep)
{
	if (j->i >= j->n)
		return -1;
	if (keep) {
		keep->seen = 1;
		keep->is_string = 0;
	}
	char c = j->s[j->i];
	if (c == '{' || c == '[')
		return container(j, c);
	if (c == '"') {
		int fit = 1;
		if (string(j, keep ? keep->val : NULL, sizeof keep->val, &fit))
			return -1;
		if (keep)
			keep->is_string = fit;
		return 0;
	}
	if (c == '-' || (c >= '0' && c <= '9'))
		return number(j);
	static const char *const words[] = {"true", "false", "null"};
	for (size_t k = 0; k < 3; k++) {
		size_t len = strlen(words[k]);
		if (j->n - j->i >= len && memcmp(j->s + j->i, words[k], len) == 0) {
			j->i += len;
			return 0;
		}
	}
	return -1;
}

/* 0: a JSON object; -1: not JSON (*where: the offset); 1: JSON, but not an object */
static int parse_netconf(const char *s, size_t n, struct field *fields, size_t nfields,
			 size_t *where)
{
	struct json j = {s, n, 0, 0, fields, nfields};
	ws(&j);
	int object = j.i < n && s[j.i] == '{';
	int rc = value(&j, NULL);
	if (rc == 0) {
		ws(&j);
		if (j.i != n)
			rc = -1;
	}
	*where = j.i;
	if (rc)
		return -1;
	return object ? 0 : 1;
}

/* the offset of the first byte that is not strict UTF-8 (as Python decodes), or n */
static size_t utf8_invalid(const unsigned char *s, size_t n)
{
	size_t i = 0;
	while (i < n) {
		unsigned c = s[i];
		size_t len = c < 0x80 ? 1 : c >= 0xc2 && c <= 0xdf ? 2 : c >= 0xe0 && c <= 0xef ? 3
			   : c >= 0xf0 && c <= 0xf4 ? 4 : 0;
		if (len == 0 || n - i < len)
			return i;
		for (size_t k = 1; k < len; k++)
			if ((s[i + k] & 0xc0) != 0x80)
				return i;
		unsigned c1 = len > 1 ? s[i + 1] : 0x80;
		if ((c == 0xe0 && c1 < 0xa0) || (c == 0xed && c1 > 0x9f) || /* overlong, surrogate */
		    (c == 0xf0 && c1 < 0x90) || (c == 0xf4 && c1 > 0x8f))   /* overlong, > U+10FFFF */
			return i;
		i += len;
	}
	return n;
}

/* ---- the exchange with the agent --------------------------------------------------- */

static long long now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* waits until fd is ready for events before the deadline; 0 ready, -1 timed out/failed */
static int wait_fd(int fd, short events, long long deadline)
{
	for (;;) {
		long long left = deadline - now_ms();
		if (left <= 0) {
			errno = ETIMEDOUT;
			return -1;
		}
		struct pollfd p = {fd, events, 0};
		int r = poll(&p, 1, (int)left);
		if (r > 0)
			return 0;
		if (r < 0 && errno != EINTR)
			return -1;
	}
}

/* the header's value (case-insensitive name) in the response head, or NULL */
static const char *header(const char *head, const char *name)
{
	size_t len = strlen(name);
	for (const char *line = strstr(head, "\r\n"); line; line = strstr(line + 2, "\r\n")) {
		if (strncasecmp(line + 2, name, len) == 0 && line[2 + len] == ':') {
			const char *v = line + 3 + len;
			while (*v == ' ' || *v == '\t')
				v++;
			return v;
		}
	}
	return NULL;
}

static int exchange(const char *sock_path, const char *req, size_t req_len)
{
	struct sockaddr_un addr = {.sun_family = AF_UNIX};
	long long deadline = now_ms() + TIMEOUT_MS;
	size_t got = 0;

	if (strlen(sock_path) >= sizeof addr.sun_path)
		return cni_error(E_INVALID_CONFIG, "network configuration: agentSocket is too long",
				 "%zu bytes, at most %zu", strlen(sock_path), sizeof addr.sun_path - 1);
	strcpy(addr.sun_path, sock_path);
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return cni_error(E_INTERNAL, "cannot make a socket", "%s", strerror(errno));
	if (connect(fd, (struct sockaddr *)&addr, sizeof addr) != 0 &&
	    !(errno == EINPROGRESS && wait_fd(fd, POLLOUT, deadline) == 0)) {
		int e = errno;
		close(fd);
		return cni_error(E_TRY_AGAIN, "the cp agent is not reachable", "agent at %s: %s",
				 sock_path, strerror(e));
	}
	for (size_t sent = 0; sent < req_len;) {
		ssize_t w = send(fd, req + sent, req_len - sent, MSG_NOSIGNAL);
		if (w > 0) {
			sent += (size_t)w;
			continue;
		}
		if (w < 0 && (errno == EAGAIN || errno == EINTR) && wait_fd(fd, POLLOUT, deadline) == 0)
			continue;
		int e = errno;
		close(fd);
		return cni_error(E_TRY_AGAIN, "the cp agent is not reachable",
				 "agent at %s: sending: %s", sock_path, strerror(e));
	}
	for (;;) {
		if (got == MAX_RESPONSE) {
			close(fd);
			return cni_error(E_INTERNAL, "the cp agent's answer is too large",
					 "agent at %s: more than %d bytes", sock_path, MAX_RESPONSE);
		}
		ssize_t r = recv(fd, resp + got, MAX_RESPONSE - got, 0);
		if (r > 0) {
			got += (size_t)r;
			continue;
		}
		if (r == 0)
			break;
		if ((errno == EAGAIN || errno == EINTR) && wait_fd(fd, POLLIN, deadline) == 0)
			continue;
		int e = errno;
		close(fd);
		return cni_error(E_TRY_AGAIN, "the cp agent did not answer", "agent at %s: %s",
				 sock_path, e == ETIMEDOUT ? "timed out" : strerror(e));
	}
	close(fd);
	if (got == 0) /* e.g. an agent shutting down */
		return cni_error(E_TRY_AGAIN, "the cp agent did not answer",
				 "agent at %s: closed the connection", sock_path);
	resp[got] = '\0';

	char *end = strstr(resp, "\r\n\r\n");
	int status = 0;
	if (!end || memchr(resp, '\0', got) != NULL || sscanf(resp, "HTTP/1.%*d %d", &status) != 1)
		return cni_error(E_INTERNAL, "the cp agent's answer is not HTTP", "agent at %s",
				 sock_path);
	*end = '\0';
	const char *payload = end + 4;
	size_t payload_len = got - (size_t)(payload - resp);
	const char *length = header(resp, "Content-Length");
	if (length && strtoul(length, NULL, 10) != payload_len)
		return cni_error(E_INTERNAL, "the cp agent's answer is truncated",
				 "agent at %s: %zu of %s bytes", sock_path, payload_len, length);
	const char *rc = header(resp, "Cni-Exit-Code");
	if (status != 200 || !rc) {
		int cut = (int)payload_len;
		while (cut > 0 && (payload[cut - 1] == '\n' || payload[cut - 1] == '\r'))
			cut--;
		return cni_error(status == 503 ? E_TRY_AGAIN : E_INTERNAL,
				 "the cp agent refused the CNI request", "HTTP %d: %.*s", status,
				 cut > 512 ? 512 : cut, payload);
	}
	write_all(1, payload, payload_len);
	int exit_code = atoi(rc);
	return exit_code < 0 || exit_code > 255 ? 1 : exit_code;
}

/* ---- main -------------------------------------------------------------------------- */

int main(int argc, char **argv)
{
	static const char *const env_names[] = {"CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS",
						"CNI_IFNAME",  "CNI_ARGS",        "CNI_PATH"};
	if (argc > 1) {
		if (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0) {
			write_all(1, USAGE, sizeof USAGE - 1);
			return 0;
		}
		fprintf(stderr, "cp-cni: takes no arguments (got '%s'); see cp-cni --help\n",
			argv[1]);
		return 2;
	}
	const char *command = getenv("CNI_COMMAND");
	command = command ? command : "";
	int version = strcmp(command, "VERSION") == 0;

	size_t n = 0;
	if (!(version && isatty(0))) {
		for (;;) {
			ssize_t r = read(0, in_buf + n, sizeof in_buf - n);
			if (r < 0 && errno == EINTR)
				continue;
			if (r < 0)
				return cni_error(E_IO, "cannot read stdin", "%s", strerror(errno));
			if (r == 0)
				break;
			n += (size_t)r;
			if (n > MAX_STDIN)
				return cni_error(E_IO, "cannot read stdin",
						 "network configuration larger than %d bytes",
						 MAX_STDIN);
		}
	}
	size_t bad = utf8_invalid((const unsigned char *)in_buf, n);
	if (bad != n)
		return cni_error(E_IO, "cannot read stdin", "not UTF-8 at byte %zu", bad);
	struct field fields[] = {{"cniVersion", "", 0, 0}, {"agentSocket", "", 0, 0}};
	size_t where = 0, blank = 0;
	while (blank < n && strchr(" \t\r\n", in_buf[blank]) && in_buf[blank])
		blank++;
	if (version && blank == n) {
		fields[0].seen = 0;
	} else {
		int rc = parse_netconf(in_buf, n, fields, 2, &where);
		if (rc < 0)
			return cni_error(E_DECODE, "network configuration is not JSON",
					 "invalid JSON at byte %zu", where);
		if (rc > 0)
			return cni_error(E_DECODE, "network configuration must be a JSON object", "");
	}
	const char *asked = fields[0].is_string && fields[0].val[0] ? fields[0].val : NULL;
	if (version) {
		char line[512];
		struct out o = {line, 0, sizeof line, 0};
		puts_(&o, "{\"cniVersion\": ");
		put_json_string(&o, asked ? asked : "1.0.0", strlen(asked ? asked : "1.0.0"));
		puts_(&o, ", \"supportedVersions\": [\"0.4.0\", \"1.0.0\"]}\n");
		write_all(1, line, o.len);
		return 0;
	}
	if (asked && (strcmp(asked, "0.4.0") == 0 || strcmp(asked, "1.0.0") == 0))
		error_version = asked;
	if (strcmp(command, "ADD") && strcmp(command, "DEL") && strcmp(command, "CHECK"))
		return cni_error(E_INVALID_ENV, "unknown CNI_COMMAND",
				 "CNI_COMMAND '%.64s': want ADD, DEL, CHECK or VERSION", command);
	const char *sock_path = DEFAULT_SOCKET;
	if (fields[1].seen) {
		if (!fields[1].is_string || !fields[1].val[0])
			return cni_error(E_INVALID_CONFIG,
					 "network configuration: agentSocket must be a non-empty string"
					 " (of at most 107 bytes)", "");
		sock_path = fields[1].val;
	}

	/* the request: headers after the body, whose length they name */
	struct out b = {body, 0, sizeof body, 0};
	puts_(&b, "{\"env\": {");
	int first = 1;
	for (size_t k = 0; k < sizeof env_names / sizeof *env_names; k++) {
		const char *v = getenv(env_names[k]);
		if (!v)
			continue;
		if (!first)
			puts_(&b, ", ");
		first = 0;
		put_json_string(&b, env_names[k], strlen(env_names[k]));
		puts_(&b, ": ");
		put_json_string(&b, v, strlen(v));
	}
	puts_(&b, "}, \"stdin\": ");
	put_json_string(&b, in_buf, n);
	puts_(&b, "}");
	if (b.overflow)
		return cni_error(E_IO, "the CNI request is too large",
				 "more than %d bytes once encoded", MAX_BODY);
	static char req[MAX_BODY + 256];
	int head = snprintf(req, 256,
			    "POST /v1/cni HTTP/1.1\r\nHost: agent\r\nContent-Type: application/json"
			    "\r\nContent-Length: %zu\r\nConnection: close\r\n\r\n",
			    b.len);
	memcpy(req + head, body, b.len);
	return exchange(sock_path, req, (size_t)head + b.len);
}
