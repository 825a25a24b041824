/* Optional C helpers for gaman_sync. Where they are not built, gaman_sync
 * does the same in Python, only slower.
 *
 * xor_mask: unmasking of client frames in place. RFC 6455 makes every
 * client-to-server frame XOR its payload with a 4-byte key. wsproto does it
 * in Python with bytes.translate over four strided slices, about 1 ms per
 * MiB: most of what a large message costs a server.
 * This does the same XOR eight bytes at a time (which compilers vectorise).
 * wsproto still parses and validates every frame; only the XOR is done here.
 *
 * client_frame: a client's whole data frame, header, masking key and masked
 * payload, in one new bytes object: one pass over the payload (encoding it
 * in Python costs a copy, an XOR pass and a join), and the keys come from a
 * pool of os.urandom() bytes refilled every 1,024 frames instead of a
 * system call per frame (RFC 6455 5.3 asks for keys a peer cannot predict,
 * not for one call each; ws, Node's library, pools them the same way). The
 * pool is emptied in a forked child, which must not reuse its parent's keys.
 *
 * send, recv, close, accept: socket calls that cannot block made without
 * releasing the GIL. CPython releases it around every socket call; with
 * other threads waiting for it, each release hands it over, and the caller,
 * back from a call that took a few microseconds, sleeps until it gets it
 * back: two context switches for nothing. Every small write of a threaded
 * server pays them under load.
 *
 * recv_for: poll() then recv(), in one release of the GIL: a client's
 * recv(timeout) reads each message this way, where Python's poll object
 * and a recv cost two releases and four calls.
 *
 * recv_gated: a blocking recv whose thread, once the data (or the end of
 * the stream) is there, queues for the GIL behind a gate that lets at most
 * GATE_PERMITS threads wait for it at a time. Every thread waiting for the
 * GIL wakes up every switch interval (5 ms) to ask for it; when thousands
 * of connections wake at once (their clients gone together), thousands of
 * waiters doing so kept both cores busy with nothing else, and the server
 * took 4 to 14 s to get through 5,000 of them (1 s behind the gate). The
 * gate is wide enough that ordinary traffic never waits at it: a gated pass
 * costs a mutex and a condition variable, which showed at 64.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <limits.h>
#include <stdint.h>
#include <string.h>

/* The masking keys not used yet (see client_frame). Taken under the GIL. */
#define KEY_POOL 4096
static unsigned char key_pool[KEY_POOL];
static Py_ssize_t key_pool_used = KEY_POOL;
static PyObject *urandom = NULL;  /* os.urandom */

#ifndef _WIN32
#include <sys/socket.h>
#include <sys/types.h>
#include <unistd.h>
#include <pthread.h>
#include <poll.h>
#include <time.h>

/* A counting semaphore whose uncontended path is one atomic operation
 * (most passes find a permit); only threads that find none take the mutex
 * and sleep. gate_permits below zero counts the threads waiting, or about
 * to, and gate_tokens the wake-ups handed to them. */
#define GATE_PERMITS 128
static int gate_permits = GATE_PERMITS;
static int gate_tokens = 0;
static pthread_mutex_t gate_mutex = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t gate_cond = PTHREAD_COND_INITIALIZER;

static void
gate_enter(void)
{
    if (__atomic_fetch_sub(&gate_permits, 1, __ATOMIC_ACQ_REL) > 0) {
        return;
    }
    pthread_mutex_lock(&gate_mutex);
    while (gate_tokens == 0) {
        pthread_cond_wait(&gate_cond, &gate_mutex);
    }
    gate_tokens--;
    pthread_mutex_unlock(&gate_mutex);
}

static void
gate_leave(void)
{
    if (__atomic_fetch_add(&gate_permits, 1, __ATOMIC_ACQ_REL) >= 0) {
        return;
    }
    pthread_mutex_lock(&gate_mutex);
    gate_tokens++;
    pthread_cond_signal(&gate_cond);
    pthread_mutex_unlock(&gate_mutex);
}

/* A child process starts with the forking thread alone: permits that other
 * threads held, and the mutex if one held it, are reset. */
static void
gate_reset_in_child(void)
{
    gate_permits = GATE_PERMITS;
    gate_tokens = 0;
    pthread_mutex_init(&gate_mutex, NULL);
    pthread_cond_init(&gate_cond, NULL);
    key_pool_used = KEY_POOL;  /* the parent's keys are not for the child */
}
#endif

static PyObject *
xor_mask(PyObject *module, PyObject *args)
{
    Py_buffer data, key;
    if (!PyArg_ParseTuple(args, "w*y*:xor_mask", &data, &key)) {
        return NULL;
    }
    if (key.len != 4) {
        PyBuffer_Release(&data);
        PyBuffer_Release(&key);
        PyErr_SetString(PyExc_ValueError, "the masking key is 4 bytes");
        return NULL;
    }
    unsigned char *p = (unsigned char *)data.buf;
    const unsigned char *k = (const unsigned char *)key.buf;
    Py_ssize_t n = data.len, i = 0;
    uint32_t k32;
    uint64_t k64, word;
    memcpy(&k32, k, 4);
    /* Both halves hold the key's four bytes in memory order, whatever the
       machine's byte order. */
    k64 = ((uint64_t)k32 << 32) | k32;
    for (; i + 8 <= n; i += 8) {
        memcpy(&word, p + i, 8);
        word ^= k64;
        memcpy(p + i, &word, 8);
    }
    for (; i < n; i++) {
        p[i] ^= k[i & 3];
    }
    PyBuffer_Release(&data);
    PyBuffer_Release(&key);
    Py_RETURN_NONE;
}

static int
next_key(unsigned char *key)
{
    if (key_pool_used + 4 > KEY_POOL) {
        PyObject *fresh;
        if (urandom == NULL) {
            PyObject *os = PyImport_ImportModule("os");
            if (os == NULL) {
                return -1;
            }
            urandom = PyObject_GetAttrString(os, "urandom");
            Py_DECREF(os);
            if (urandom == NULL) {
                return -1;
            }
        }
        /* os.urandom may release the GIL: another thread may refill too.
         * Each refill overwrites the whole pool before taking from it, so
         * no key is handed out twice. */
        fresh = PyObject_CallFunction(urandom, "n", (Py_ssize_t)KEY_POOL);
        if (fresh == NULL) {
            return -1;
        }
        if (!PyBytes_Check(fresh) || PyBytes_GET_SIZE(fresh) != KEY_POOL) {
            Py_DECREF(fresh);
            PyErr_SetString(PyExc_RuntimeError, "os.urandom gave the wrong size");
            return -1;
        }
        memcpy(key_pool, PyBytes_AS_STRING(fresh), KEY_POOL);
        Py_DECREF(fresh);
        key_pool_used = 0;
    }
    memcpy(key, key_pool + key_pool_used, 4);
    /* Used keys are not left in memory. */
    memset(key_pool + key_pool_used, 0, 4);
    key_pool_used += 4;
    return 0;
}

static PyObject *
client_frame(PyObject *module, PyObject *message)
{
    Py_buffer view;
    PyObject *text = NULL;  /* a str's UTF-8, when the str is not ASCII */
    PyObject *copy = NULL;  /* a memoryview that is not contiguous, copied */
    PyObject *frame = NULL;
    const unsigned char *payload;
    unsigned char *out, key[4];
    Py_ssize_t n, i, head;
    unsigned char first;
    uint32_t k32;
    uint64_t k64, word;

    view.obj = NULL;
    if (PyUnicode_Check(message)) {
        first = 0x81;  /* FIN | TEXT */
        if (PyUnicode_IS_ASCII(message)) {
            /* An ASCII str is its own UTF-8: no copy. */
            payload = (const unsigned char *)PyUnicode_DATA(message);
            n = PyUnicode_GET_LENGTH(message);
        }
        else {
            /* Not PyUnicode_AsUTF8AndSize: it would keep the UTF-8 in the
             * str for as long as the application keeps the str. */
            text = PyUnicode_AsUTF8String(message);
            if (text == NULL) {
                return NULL;
            }
            payload = (const unsigned char *)PyBytes_AS_STRING(text);
            n = PyBytes_GET_SIZE(text);
        }
    }
    else if (PyBytes_Check(message) || PyByteArray_Check(message)
             || PyMemoryView_Check(message)) {
        first = 0x82;  /* FIN | BINARY */
        if (PyObject_GetBuffer(message, &view, PyBUF_SIMPLE) < 0) {
            /* A memoryview that is not contiguous: as bytes() copies it. */
            PyErr_Clear();
            copy = PyBytes_FromObject(message);
            if (copy == NULL) {
                return NULL;
            }
            payload = (const unsigned char *)PyBytes_AS_STRING(copy);
            n = PyBytes_GET_SIZE(copy);
        }
        else {
            payload = (const unsigned char *)view.buf;
            n = view.len;
        }
    }
    else {
        return PyErr_Format(PyExc_TypeError, "a message is str or bytes, not %.100s",
                            Py_TYPE(message)->tp_name);
    }
    head = n < 126 ? 2 : n < 65536 ? 4 : 10;
    if (next_key(key) < 0) {
        goto done;
    }
    frame = PyBytes_FromStringAndSize(NULL, head + 4 + n);
    if (frame == NULL) {
        goto done;
    }
    out = (unsigned char *)PyBytes_AS_STRING(frame);
    out[0] = first;
    if (n < 126) {
        out[1] = 0x80 | (unsigned char)n;
    }
    else if (n < 65536) {
        out[1] = 0x80 | 126;
        out[2] = (unsigned char)(n >> 8);
        out[3] = (unsigned char)n;
    }
    else {
        uint64_t len = (uint64_t)n;
        out[1] = 0x80 | 127;
        for (i = 0; i < 8; i++) {
            out[2 + i] = (unsigned char)(len >> (56 - 8 * i));
        }
    }
    memcpy(out + head, key, 4);
    out += head + 4;
    /* The XOR of xor_mask, from the payload into the frame. */
    memcpy(&k32, key, 4);
    k64 = ((uint64_t)k32 << 32) | k32;
    for (i = 0; i + 8 <= n; i += 8) {
        memcpy(&word, payload + i, 8);
        word ^= k64;
        memcpy(out + i, &word, 8);
    }
    for (; i < n; i++) {
        out[i] = payload[i] ^ key[i & 3];
    }
done:
    if (view.obj != NULL) {
        PyBuffer_Release(&view);
    }
    Py_XDECREF(text);
    Py_XDECREF(copy);
    return frame;
}

#ifndef _WIN32
static PyObject *
send_nonblocking(PyObject *module, PyObject *args)
{
    int fd, flags = 0;
    Py_buffer data;
    ssize_t sent;
    int err = 0;
    /* flags may be left out: a transport binds the descriptor alone
     * (functools.partial(send, fd)), so that a write calls C directly. */
    if (!PyArg_ParseTuple(args, "iy*|i:send", &fd, &data, &flags)) {
        return NULL;
    }
#ifdef MSG_NOSIGNAL
    flags |= MSG_NOSIGNAL;  /* a peer gone must not kill us with SIGPIPE */
#endif
    for (;;) {
        sent = send(fd, data.buf, (size_t)data.len, flags | MSG_DONTWAIT);
        err = errno;
        if (sent >= 0 || err != EINTR) {
            break;
        }
        if (PyErr_CheckSignals() < 0) {
            PyBuffer_Release(&data);
            return NULL;
        }
    }
    PyBuffer_Release(&data);
    if (sent < 0) {
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyLong_FromSsize_t(sent);
}

/* One recv() call, retried on EINTR; -1 with *err set on failure, and also
 * (err 0) when a signal handler raised. Gated: a blocking recv that releases
 * the GIL, then queues for it behind the gate; else a non-blocking one that
 * keeps the GIL. */
static ssize_t
recv_into(int fd, char *buffer, Py_ssize_t size, int flags, int gated, int *err)
{
    ssize_t got;
    for (;;) {
        if (gated) {
            Py_BEGIN_ALLOW_THREADS
            got = recv(fd, buffer, (size_t)size, flags);
            *err = errno;
            gate_enter();
            Py_END_ALLOW_THREADS
            gate_leave();
        }
        else {
            got = recv(fd, buffer, (size_t)size, flags | MSG_DONTWAIT);
            *err = errno;
        }
        if (got >= 0 || *err != EINTR) {
            return got;
        }
        if (PyErr_CheckSignals() < 0) {
            *err = 0;
            return -1;
        }
    }
}

/* Reads of up to this size go to a buffer on the stack, then to a bytes
 * object of the size received. A connection waits for its peer in a read
 * of this size (see the engine's _RECV_MIN): a heap buffer allocated up
 * front, as socket.recv() does, would be held by every idle connection
 * (2 KiB each, a tenth of what one costs); the copy costs less than the
 * bytes object's shrinking after a short read. */
#define STACK_RECV 2048

/* recv() into a new bytes object, as socket.recv() does. */
static PyObject *
recv_bytes(int fd, Py_ssize_t size, int flags, int gated)
{
    int err = 0;
    ssize_t got;
    PyObject *buffer;
    if (size < 0) {
        PyErr_SetString(PyExc_ValueError, "negative buffer size");
        return NULL;
    }
    if (size <= STACK_RECV) {
        char small[STACK_RECV];
        got = recv_into(fd, small, size, flags, gated, &err);
        if (got < 0) {
            if (err == 0) {
                return NULL;
            }
            errno = err;
            return PyErr_SetFromErrno(PyExc_OSError);
        }
        return PyBytes_FromStringAndSize(small, got);
    }
    buffer = PyBytes_FromStringAndSize(NULL, size);
    if (buffer == NULL) {
        return NULL;
    }
    got = recv_into(fd, PyBytes_AS_STRING(buffer), size, flags, gated, &err);
    if (got < 0) {
        Py_DECREF(buffer);
        if (err == 0) {
            return NULL;
        }
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    if (got != size && _PyBytes_Resize(&buffer, got) < 0) {
        return NULL;
    }
    return buffer;
}

static PyObject *
recv_nonblocking(PyObject *module, PyObject *args)
{
    int fd, flags;
    Py_ssize_t size;
    if (!PyArg_ParseTuple(args, "ini:recv", &fd, &size, &flags)) {
        return NULL;
    }
    return recv_bytes(fd, size, flags, 0);
}

static PyObject *
recv_gated(PyObject *module, PyObject *args)
{
    int fd;
    Py_ssize_t size;
    if (!PyArg_ParseTuple(args, "in:recv_gated", &fd, &size)) {
        return NULL;
    }
    return recv_bytes(fd, size, 0, 1);
}

static PyObject *socket_timeout = NULL;  /* socket.timeout */

static double
monotonic_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static PyObject *
recv_for(PyObject *module, PyObject *args)
{
    int fd, ready, err, ms;
    Py_ssize_t size;
    double timeout, deadline, remaining;
    struct pollfd pfd;
    ssize_t got;
    PyObject *buffer = NULL;
    char small[STACK_RECV];
    char *into = small;
    if (!PyArg_ParseTuple(args, "ind:recv_for", &fd, &size, &timeout)) {
        return NULL;
    }
    if (size < 0) {
        PyErr_SetString(PyExc_ValueError, "negative buffer size");
        return NULL;
    }
    if (socket_timeout == NULL) {
        PyObject *socket_module = PyImport_ImportModule("socket");
        if (socket_module == NULL) {
            return NULL;
        }
        socket_timeout = PyObject_GetAttrString(socket_module, "timeout");
        Py_DECREF(socket_module);
        if (socket_timeout == NULL) {
            return NULL;
        }
    }
    if (size > STACK_RECV) {
        /* A large read goes straight into its bytes object; a small one
         * into the stack, as recv_bytes does: no heap buffer while waiting. */
        buffer = PyBytes_FromStringAndSize(NULL, size);
        if (buffer == NULL) {
            return NULL;
        }
        into = PyBytes_AS_STRING(buffer);
    }
    deadline = monotonic_now() + timeout;
    remaining = timeout;
    for (;;) {
        pfd.fd = fd;
        pfd.events = POLLIN;
        pfd.revents = 0;
        got = -1;
        /* Rounded up, as Python's poll does: never a wait shorter than asked;
         * a wait longer than poll() takes is made of several. */
        if (!(remaining > 0)) {
            ms = 0;
        }
        else if (remaining * 1000.0 >= (double)INT_MAX) {
            ms = INT_MAX;
        }
        else {
            ms = (int)(remaining * 1000.0 + 0.999);
        }
        Py_BEGIN_ALLOW_THREADS
        ready = poll(&pfd, 1, ms);
        err = errno;
        if (ready > 0) {
            got = recv(fd, into, (size_t)size, MSG_DONTWAIT);
            err = errno;
        }
        gate_enter();
        Py_END_ALLOW_THREADS
        gate_leave();
        if (ready == 0 && ms == INT_MAX) {
            remaining = deadline - monotonic_now();
            continue;
        }
        if (ready == 0) {
            Py_XDECREF(buffer);
            PyErr_SetString(socket_timeout, "timed out");
            return NULL;
        }
        if (got >= 0) {
            break;
        }
        if (err != EINTR && err != EAGAIN && err != EWOULDBLOCK) {
            Py_XDECREF(buffer);
            errno = err;
            return PyErr_SetFromErrno(PyExc_OSError);
        }
        /* Interrupted, or readable but nothing there after all (another
         * reader took it): wait for what is left of the timeout. */
        if (err == EINTR && PyErr_CheckSignals() < 0) {
            Py_XDECREF(buffer);
            return NULL;
        }
        remaining = deadline - monotonic_now();
    }
    if (buffer == NULL) {
        return PyBytes_FromStringAndSize(small, got);
    }
    if (got != size && _PyBytes_Resize(&buffer, got) < 0) {
        return NULL;
    }
    return buffer;
}

#ifdef __linux__
static PyObject *
accept_nonblocking(PyObject *module, PyObject *args)
{
    int fd, conn;
    struct sockaddr_storage addr;
    socklen_t addrlen;
    if (!PyArg_ParseTuple(args, "i:accept", &fd)) {
        return NULL;
    }
    for (;;) {
        addrlen = sizeof(addr);
        /* The listener is non-blocking; the new socket is blocking. */
        conn = accept4(fd, (struct sockaddr *)&addr, &addrlen, SOCK_CLOEXEC);
        if (conn >= 0 || errno != EINTR) {
            break;
        }
        if (PyErr_CheckSignals() < 0) {
            return NULL;
        }
    }
    if (conn < 0) {
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    if (addrlen > sizeof(addr)) {
        addrlen = sizeof(addr);
    }
    {
        PyObject *result = Py_BuildValue("(iy#)", conn, (const char *)&addr,
                                         (Py_ssize_t)addrlen);
        if (result == NULL) {
            close(conn);
        }
        return result;
    }
}
#endif

static PyObject *
close_fd(PyObject *module, PyObject *args)
{
    int fd;
    if (!PyArg_ParseTuple(args, "i:close", &fd)) {
        return NULL;
    }
    /* Without SO_LINGER, closing a socket never waits. On EINTR the
       descriptor is closed all the same: no retry. */
    if (close(fd) < 0 && errno != EINTR) {
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    Py_RETURN_NONE;
}
#endif

static PyMethodDef methods[] = {
    {"xor_mask", xor_mask, METH_VARARGS,
     "xor_mask(data, key): XOR a writable buffer in place with a 4-byte key, "
     "starting at the key's first byte."},
    {"client_frame", client_frame, METH_O,
     "client_frame(message): a client's whole data frame for a message (str as "
     "text, bytes-like as binary), masked with a fresh key, as one bytes object."},
#ifndef _WIN32
    {"send", send_nonblocking, METH_VARARGS,
     "send(fd, data, flags): socket.send() with MSG_DONTWAIT, keeping the GIL."},
    {"recv", recv_nonblocking, METH_VARARGS,
     "recv(fd, size, flags): socket.recv() with MSG_DONTWAIT, keeping the GIL."},
    {"recv_for", recv_for, METH_VARARGS,
     "recv_for(fd, size, timeout): wait up to timeout seconds for data with "
     "poll(), then recv() what is there, in one release of the GIL; "
     "socket.timeout if nothing came."},
    {"recv_gated", recv_gated, METH_VARARGS,
     "recv_gated(fd, size): a blocking socket.recv() that queues for the GIL "
     "behind a gate (see the module's comment)."},
#ifdef __linux__
    {"accept", accept_nonblocking, METH_VARARGS,
     "accept(fd): (new fd, raw peer address) from a non-blocking listener, "
     "keeping the GIL."},
#endif
    {"close", close_fd, METH_VARARGS,
     "close(fd): close a socket's descriptor, keeping the GIL."},
#endif
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "gaman_sync._speedups",
    "Optional C helpers of gaman_sync.", -1, methods,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
#ifndef _WIN32
    static int registered = 0;
    if (!registered) {
        if (pthread_atfork(NULL, NULL, gate_reset_in_child) != 0) {
            PyErr_SetString(PyExc_OSError, "pthread_atfork failed");
            return NULL;
        }
        registered = 1;
    }
#endif

    return PyModule_Create(&module);
}
