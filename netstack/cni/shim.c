/*
 * netstack CNI plugin: the compiled front (built by `netctl cni install` when a C compiler
 * is present). It does what netstack/cni/main.py's fast path does, without starting a
 * Python interpreter (~10-20 ms here, more than the rest of a DEL): it sends the request
 * {"op":"cni","reply":"raw","env":{CNI_*...},"stdin":"..."} to netstackd's socket and
 * prints the answer ("<code> <length>\n<stdout>"). Whenever that path cannot take the
 * call (no daemon, VERSION, input that is not UTF-8, a daemon answering with a JSON
 * error), it runs the Python plugin in-process instead, with the same stdin; once the
 * daemon has the request, it never redoes the work (CNI error 11 if no full answer).
 *
 * NETSTACK_PYTHON, NETSTACK_PACKAGE_ROOT, NETSTACK_DEFAULT_STATE_DIR and
 * NETSTACK_DEFAULT_RUN_DIR come from a header netctl writes (shim_config.h).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

#include "shim_config.h"

#define DAEMON_TIMEOUT_SECONDS 300
#define TRY_AGAIN_LATER 11

extern char **environ;

struct buffer {
    char *data;
    size_t length, size;
};

static void grow(struct buffer *b, size_t more) {
    if (b->length + more + 1 <= b->size) return;
    size_t size = b->size ? b->size : 4096;
    while (size < b->length + more + 1) size *= 2;
    char *data = realloc(b->data, size);
    if (!data) { perror("netstack"); exit(1); }
    b->data = data;
    b->size = size;
}

static void append(struct buffer *b, const char *text, size_t length) {
    grow(b, length);
    memcpy(b->data + b->length, text, length);
    b->length += length;
    b->data[b->length] = 0;
}

static void append_text(struct buffer *b, const char *text) { append(b, text, strlen(text)); }

/* A JSON string: quote, backslash and control characters escaped; the rest as it is. */
static void append_quoted(struct buffer *b, const char *text, size_t length) {
    append(b, "\"", 1);
    for (size_t i = 0; i < length; i++) {
        unsigned char c = (unsigned char)text[i];
        char escaped[8];
        if (c == '"' || c == '\\') {
            escaped[0] = '\\';
            escaped[1] = (char)c;
            append(b, escaped, 2);
        } else if (c < 32) {
            snprintf(escaped, sizeof escaped, "\\u%04x", c);
            append(b, escaped, 6);
        } else {
            append(b, (const char *)&text[i], 1);
        }
    }
    append(b, "\"", 1);
}

/* Strict UTF-8 (no surrogates, no overlongs): what Python's decoder accepts. */
static int valid_utf8(const unsigned char *s, size_t n) {
    size_t i = 0;
    while (i < n) {
        unsigned char c = s[i];
        size_t extra;
        unsigned int cp;
        if (c < 0x80) { i++; continue; }
        if (c >= 0xc2 && c <= 0xdf) { extra = 1; cp = c & 0x1f; }
        else if (c >= 0xe0 && c <= 0xef) { extra = 2; cp = c & 0x0f; }
        else if (c >= 0xf0 && c <= 0xf4) { extra = 3; cp = c & 0x07; }
        else return 0;
        if (n - i <= extra) return 0; /* truncated sequence */
        for (size_t k = 1; k <= extra; k++) {
            if ((s[i + k] & 0xc0) != 0x80) return 0;
            cp = (cp << 6) | (s[i + k] & 0x3f);
        }
        if ((extra == 2 && (cp < 0x800 || (cp >= 0xd800 && cp <= 0xdfff))) ||
            (extra == 3 && (cp < 0x10000 || cp > 0x10ffff)))
            return 0;
        i += extra + 1;
    }
    return 1;
}

/* Run the Python plugin in-process (no daemon round trip), stdin replayed from memory. */
static void run_python(const struct buffer *input) {
    int fd = memfd_create("netstack-cni-stdin", 0);
    if (fd >= 0) {
        size_t done = 0;
        while (done < input->length) {
            ssize_t n = write(fd, input->data + done, input->length - done);
            if (n < 0) { if (errno == EINTR) continue; break; }
            done += (size_t)n;
        }
        lseek(fd, 0, SEEK_SET);
        dup2(fd, 0);
        close(fd);
    }
    if (*NETSTACK_DEFAULT_STATE_DIR) setenv("NETSTACK_STATE_DIR", NETSTACK_DEFAULT_STATE_DIR, 0);
    if (*NETSTACK_DEFAULT_RUN_DIR) setenv("NETSTACK_RUN_DIR", NETSTACK_DEFAULT_RUN_DIR, 0);
    setenv("NETSTACK_CNI_IN_PROCESS", "1", 1);
    char *argv[] = {NETSTACK_PYTHON, "-S", "-c",
                    "import sys; sys.path.insert(0, sys.argv[1]); "
                    "from netstack.cni.main import main; raise SystemExit(main())",
                    NETSTACK_PACKAGE_ROOT, NULL};
    execv(NETSTACK_PYTHON, argv);
    fprintf(stderr, "netstack: cannot run %s: %s\n", NETSTACK_PYTHON, strerror(errno));
    printf("{\"cniVersion\":\"1.1.0\",\"code\":5,\"msg\":\"cannot start the netstack plugin\"}");
    exit(1);
}

static int gone(const char *why) {
    struct buffer out = {0};
    char message[512];
    snprintf(message, sizeof message, "netstackd did not finish the request: %s", why);
    append_text(&out, "{\"cniVersion\":\"1.1.0\",\"code\":11,\"msg\":");
    append_quoted(&out, message, strlen(message));
    append_text(&out, ",\"details\":");
    const char *details = "retry; DEL is idempotent and ADD is all or nothing";
    append_quoted(&out, details, strlen(details));
    append_text(&out, "}");
    fwrite(out.data, 1, out.length, stdout);
    return 1;
}

int main(void) {
    struct buffer input = {0};
    for (;;) {
        grow(&input, 65536);
        ssize_t n = read(0, input.data + input.length, input.size - input.length - 1);
        if (n < 0) { if (errno == EINTR) continue; break; }
        if (n == 0) break;
        input.length += (size_t)n;
    }
    if (!input.data) grow(&input, 1);
    input.data[input.length] = 0;

    const char *command = getenv("CNI_COMMAND");
    if ((command && strcmp(command, "VERSION") == 0) || getenv("NETSTACK_CNI_IN_PROCESS") ||
        !valid_utf8((unsigned char *)input.data, input.length))
        run_python(&input);

    struct buffer request = {0};
    append_text(&request, "{\"op\":\"cni\",\"reply\":\"raw\",\"env\":{");
    int first = 1;
    for (char **entry = environ; *entry; entry++) {
        if (strncmp(*entry, "CNI_", 4) != 0) continue;
        const char *equals = strchr(*entry, '=');
        if (!equals || !valid_utf8((unsigned char *)*entry, strlen(*entry))) run_python(&input);
        if (!first) append_text(&request, ",");
        first = 0;
        append_quoted(&request, *entry, (size_t)(equals - *entry));
        append_text(&request, ":");
        append_quoted(&request, equals + 1, strlen(equals + 1));
    }
    append_text(&request, "},\"stdin\":");
    append_quoted(&request, input.data, input.length);
    append_text(&request, "}\n");

    const char *run_dir = getenv("NETSTACK_RUN_DIR");
    if (!run_dir) run_dir = *NETSTACK_DEFAULT_RUN_DIR ? NETSTACK_DEFAULT_RUN_DIR : "/run/netstack";
    struct sockaddr_un address = {.sun_family = AF_UNIX};
    if ((size_t)snprintf(address.sun_path, sizeof address.sun_path, "%s/netstackd.sock",
                         run_dir) >= sizeof address.sun_path)
        run_python(&input);
    int sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (sock < 0 || connect(sock, (struct sockaddr *)&address, sizeof address) != 0)
        run_python(&input); /* no daemon: do it here */
    struct timeval timeout = {.tv_sec = DAEMON_TIMEOUT_SECONDS};
    setsockopt(sock, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof timeout);
    setsockopt(sock, SOL_SOCKET, SO_SNDTIMEO, &timeout, sizeof timeout);
    size_t sent = 0;
    while (sent < request.length) {
        ssize_t n = send(sock, request.data + sent, request.length - sent, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR) continue;
            close(sock);
            run_python(&input); /* the daemon never got it whole */
        }
        sent += (size_t)n;
    }

    struct buffer reply = {0};
    long code = -1, length = -1;
    size_t body = 0;
    for (;;) {
        grow(&reply, 65536);
        ssize_t n = recv(sock, reply.data + reply.length, reply.size - reply.length - 1, 0);
        if (n < 0) {
            if (errno == EINTR) continue;
            return gone(errno == EAGAIN ? "timed out" : strerror(errno));
        }
        if (n == 0) break;
        reply.length += (size_t)n;
        reply.data[reply.length] = 0;
        if (length < 0) {
            char *newline = memchr(reply.data, '\n', reply.length);
            if (!newline) continue;
            if (reply.data[0] == '{') { close(sock); run_python(&input); } /* a JSON error */
            char *end;
            code = strtol(reply.data, &end, 10);
            if (end == reply.data || *end != ' ') return gone("malformed reply");
            length = strtol(end + 1, &end, 10);
            if (end != newline || length < 0) return gone("malformed reply");
            body = (size_t)(newline + 1 - reply.data);
        }
        if (reply.length - body >= (size_t)length) break;
    }
    close(sock);
    if (length < 0) return gone(reply.length ? "malformed reply" : "no reply");
    if (reply.length - body != (size_t)length) {
        char why[96];
        snprintf(why, sizeof why, "short reply (%zu of %ld bytes)", reply.length - body, length);
        return gone(why);
    }
    fwrite(reply.data + body, 1, (size_t)length, stdout);
    fflush(stdout);
    return (int)code;
}
