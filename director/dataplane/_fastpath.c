/*
 * director.dataplane._fastpath: the engine's established-flow loop in C.
 *
 * The same decision as director.dataplane.forwarder.Forwarder.fast() for Direct
 * Routing, applied to a run of consecutive TPACKET_V2 ring slots: for each
 * ready slot whose frame is an IPv4 (no options) or IPv6 (no extension
 * header) TCP/UDP packet, not a fragment, of a confirmed flow that changes
 * nothing but its expiry, to a live route and a DR server, it
 *
 *   - refreshes the flow's expiry and LRU position (ConnTable.refresh),
 *   - counts the packet on the flow's route (Route.packets, Route.bytes),
 *   - writes the real server's and the director's MACs over the frame,
 *   - points the slot's sendmmsg iovec at the slot's virtio_net_hdr + frame.
 *
 * It stops at the first slot that is not ready or that it does not handle,
 * and returns how many slots it handled; the Python loop (Worker.drain)
 * sends the run and hands the next frame to Forwarder.fast()/forward(),
 * which decide everything else. Python objects are read and written only
 * through their public attributes, so the pure-Python forwarder and this
 * loop share one state; tests/director/dataplane/test_fastpath.py holds the two to
 * the same results on the same traffic.
 *
 * Why C: a CPython loop spends about 1.2 us per frame on this work, against
 * a budget of 0.3 us left by the kernel's own AF_PACKET and sendmmsg cost
 * (docs/packet-path.md section 8).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define TP_STATUS_USER 1u
#define VNET_LEN 10
#define NSTATES 12

static PyObject *s_expires, *s_state, *s_dest, *s_available, *s_tx, *s_tag, *s_live, *s_packets, *s_bytes,
    *s_move_to_end;

/* attr += delta on a Python int attribute; 0 on success */
static int add_attr(PyObject *obj, PyObject *name, long long delta)
{
    PyObject *v = PyObject_GetAttr(obj, name);
    if (v == NULL)
        return -1;
    long long x = PyLong_AsLongLong(v);
    Py_DECREF(v);
    if (x == -1 && PyErr_Occurred())
        return -1;
    PyObject *n = PyLong_FromLongLong(x + delta);
    if (n == NULL)
        return -1;
    int rc = PyObject_SetAttr(obj, name, n);
    Py_DECREF(n);
    return rc;
}

/* 1 if the attribute is true, 0 if false, -1 on error */
static int attr_true(PyObject *obj, PyObject *name)
{
    PyObject *v = PyObject_GetAttr(obj, name);
    if (v == NULL)
        return -1;
    int t = PyObject_IsTrue(v);
    Py_DECREF(v);
    return t;
}

/*
 * One frame: 1 = handled (forwarded), 0 = not ours (Python decides), -1 = error.
 * f points at the Ethernet frame, len is its captured length.
 */
static int handle(unsigned char *f, uint32_t len, double now, PyObject *confirmed, const unsigned char *next,
                  const double *timeouts)
{
    unsigned char keybuf[37];
    Py_ssize_t klen;
    uint32_t total;
    unsigned flags;

    if (len < 42)
        return 0;
    if (f[12] == 0x08 && f[13] == 0x00 && f[14] == 0x45 && !(f[20] & 0x3F) && !f[21]) {
        total = (uint32_t)f[16] << 8 | f[17];
        if (total + 14 > len)
            return 0;
        if (f[23] == 6) {
            if (total < 34)
                return 0;
            flags = f[47];
        } else if (total < 28) {
            return 0;
        } else {
            flags = 0;
        }
        keybuf[0] = f[23];
        memcpy(keybuf + 1, f + 26, 12);
        klen = 13;
    } else if (f[12] == 0x86 && f[13] == 0xDD && len >= 62) {
        if (f[14] >> 4 != 6)
            return 0;
        total = 40 + ((uint32_t)f[18] << 8 | f[19]);
        if (total + 14 > len)
            return 0;
        if (f[20] == 6) {
            if (total < 54)
                return 0;
            flags = f[67];
        } else if (f[20] == 17 && total >= 48) {
            flags = 0;
        } else {
            return 0;
        }
        keybuf[0] = f[20];
        memcpy(keybuf + 1, f + 22, 36);
        klen = 37;
    } else {
        return 0;
    }
    if (keybuf[0] != 6 && keybuf[0] != 17)
        return 0; /* no such key in the table anyway: skip the lookup */

    PyObject *key = PyBytes_FromStringAndSize((const char *)keybuf, klen);
    if (key == NULL)
        return -1;
    int rc = -1;
    PyObject *conn = PyDict_GetItemWithError(confirmed, key); /* borrowed */
    PyObject *expires = NULL, *state_o = NULL, *dest = NULL, *tx = NULL, *route = NULL, *nexp = NULL, *res = NULL;
    if (conn == NULL) {
        rc = PyErr_Occurred() ? -1 : 0;
        goto out;
    }
    Py_INCREF(conn); /* the attribute calls below may run Python code */
    /* ConnTable.refresh: live, confirmed, no state change */
    if ((expires = PyObject_GetAttr(conn, s_expires)) == NULL)
        goto out;
    double exp = PyFloat_AsDouble(expires);
    if (exp == -1.0 && PyErr_Occurred())
        goto out;
    if (exp <= now) {
        rc = 0;
        goto out;
    }
    if ((dest = PyObject_GetAttr(conn, s_dest)) == NULL)
        goto out;
    int avail = attr_true(dest, s_available);
    if (avail <= 0) {
        rc = avail < 0 ? -1 : 0;
        goto out;
    }
    if ((state_o = PyObject_GetAttr(conn, s_state)) == NULL)
        goto out;
    long state = PyLong_AsLong(state_o);
    if (state == -1 && PyErr_Occurred())
        goto out;
    if (state < 0 || state >= NSTATES || next[state * 256 + flags] != state) {
        rc = 0;
        goto out;
    }
    /* Forwarder.fast: only a live route to a DR server */
    if ((tx = PyObject_GetAttr(dest, s_tx)) == NULL)
        goto out;
    if (!PyBytes_CheckExact(tx) || PyBytes_GET_SIZE(tx) != 12) {
        rc = 0;
        goto out;
    }
    if ((route = PyObject_GetAttr(conn, s_tag)) == NULL)
        goto out;
    int live = attr_true(route, s_live);
    if (live <= 0) {
        rc = live < 0 ? -1 : 0;
        goto out;
    }
    /* From here on the packet is forwarded: the effects of refresh() and fast(). */
    if ((nexp = PyFloat_FromDouble(now + timeouts[state])) == NULL)
        goto out;
    if (PyObject_SetAttr(conn, s_expires, nexp) < 0)
        goto out;
    if ((res = PyObject_CallMethodOneArg(confirmed, s_move_to_end, key)) == NULL)
        goto out;
    if (add_attr(route, s_packets, 1) < 0 || add_attr(route, s_bytes, total) < 0)
        goto out;
    memcpy(f, PyBytes_AS_STRING(tx), 12);
    rc = 1;
out:
    Py_XDECREF(res);
    Py_XDECREF(nexp);
    Py_XDECREF(route);
    Py_XDECREF(tx);
    Py_XDECREF(state_o);
    Py_XDECREF(dest);
    Py_XDECREF(expires);
    Py_XDECREF(conn);
    Py_DECREF(key);
    return rc;
}

/*
 * run(ring, iov, iov0, slot, count, frame_size, now, confirmed, next, timeouts) -> handled
 *
 * ring: the mmap'd RX ring (writable buffer); iov: the SlotSender's iovec
 * words (writable buffer of uint64, slot i's iovec at iov0 + 2 i); handles
 * slots slot .. slot + count - 1 at most, in order.
 */
static PyObject *run(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 10) {
        PyErr_SetString(PyExc_TypeError, "run() takes 10 arguments");
        return NULL;
    }
    Py_buffer ring, iov, nx;
    if (PyObject_GetBuffer(args[0], &ring, PyBUF_WRITABLE) < 0)
        return NULL;
    if (PyObject_GetBuffer(args[1], &iov, PyBUF_WRITABLE) < 0) {
        PyBuffer_Release(&ring);
        return NULL;
    }
    if (PyObject_GetBuffer(args[8], &nx, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(&iov);
        PyBuffer_Release(&ring);
        return NULL;
    }
    PyObject *result = NULL;
    Py_ssize_t iov0 = PyLong_AsSsize_t(args[2]);
    Py_ssize_t slot = PyLong_AsSsize_t(args[3]);
    Py_ssize_t count = PyLong_AsSsize_t(args[4]);
    Py_ssize_t fsz = PyLong_AsSsize_t(args[5]);
    double now = PyFloat_AsDouble(args[6]);
    PyObject *confirmed = args[7];
    double timeouts[NSTATES];
    if (PyErr_Occurred())
        goto done;
    if (!PyDict_Check(confirmed) || nx.len != NSTATES * 256 || !PyTuple_Check(args[9]) ||
        PyTuple_GET_SIZE(args[9]) != NSTATES) {
        PyErr_SetString(PyExc_TypeError, "run(): bad table arguments");
        goto done;
    }
    for (int i = 0; i < NSTATES; i++) {
        timeouts[i] = PyFloat_AsDouble(PyTuple_GET_ITEM(args[9], i));
        if (timeouts[i] == -1.0 && PyErr_Occurred())
            goto done;
    }
    if (slot < 0 || count < 0 || fsz < 64 || (slot + count) * fsz > ring.len ||
        (iov0 + 2 * (slot + count)) * 8 > iov.len) {
        PyErr_SetString(PyExc_ValueError, "run(): slots outside the ring or the iovecs");
        goto done;
    }
    unsigned char *base = ring.buf;
    uint64_t *iovq = iov.buf;
    Py_ssize_t done_n = 0;
    for (; done_n < count; done_n++) {
        unsigned char *hdr = base + (slot + done_n) * fsz;
        uint32_t status, snaplen;
        uint16_t mac;
        memcpy(&status, hdr, 4);
        if (!(status & TP_STATUS_USER))
            break;
        memcpy(&snaplen, hdr + 8, 4);
        memcpy(&mac, hdr + 12, 2);
        if (mac < VNET_LEN || mac + (Py_ssize_t)snaplen > fsz)
            break;
        int r = handle(hdr + mac, snaplen, now, confirmed, nx.buf, timeouts);
        if (r < 0)
            goto done;
        if (r == 0)
            break;
        Py_ssize_t j = iov0 + 2 * (slot + done_n);
        iovq[j] = (uint64_t)(uintptr_t)(hdr + mac - VNET_LEN);
        iovq[j + 1] = snaplen + VNET_LEN;
    }
    result = PyLong_FromSsize_t(done_n);
done:
    PyBuffer_Release(&nx);
    PyBuffer_Release(&iov);
    PyBuffer_Release(&ring);
    return result;
}

/*
 * glb.hashing.client_hash in C: Linux's jhash2 of a packed address's
 * big-endian words (and the port as one more word). mh hashes every new
 * flow's client with it (scheduler.MaglevHash); the pure-Python version
 * costs ~5 us, this ~0.1. The tc program computes the same (glb_tc.bpf.c
 * jhash_addr); tests/director/dataplane/test_fastpath.py holds this one to
 * the Python reference.
 */
#define ROL32(w, s) (((w) << (s)) | ((w) >> (32 - (s))))

static PyObject *client_hash(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer addr;
    uint32_t k[5], a, b, c, seed;
    int n;

    if (nargs != 3)
        return PyErr_Format(PyExc_TypeError, "client_hash(addr, port, seed)");
    if (PyObject_GetBuffer(args[0], &addr, PyBUF_SIMPLE) < 0)
        return NULL;
    if (addr.len != 4 && addr.len != 16) {
        PyBuffer_Release(&addr);
        return PyErr_Format(PyExc_ValueError, "an address is 4 or 16 bytes");
    }
    n = (int)(addr.len / 4);
    for (int i = 0; i < n; i++) {
        const uint8_t *p = (const uint8_t *)addr.buf + 4 * i;
        k[i] = (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
    }
    PyBuffer_Release(&addr);
    if (args[1] != Py_None) {
        k[n++] = (uint32_t)PyLong_AsUnsignedLongMask(args[1]);
    }
    seed = (uint32_t)PyLong_AsUnsignedLongMask(args[2]);
    if (PyErr_Occurred())
        return NULL;
    a = b = c = 0xdeadbeefu + ((uint32_t)n << 2) + seed;
    const uint32_t *w = k;
    while (n > 3) {
        a += w[0];
        b += w[1];
        c += w[2];
        a -= c; a ^= ROL32(c, 4); c += b;
        b -= a; b ^= ROL32(a, 6); a += c;
        c -= b; c ^= ROL32(b, 8); b += a;
        a -= c; a ^= ROL32(c, 16); c += b;
        b -= a; b ^= ROL32(a, 19); a += c;
        c -= b; c ^= ROL32(b, 4); b += a;
        n -= 3;
        w += 3;
    }
    if (n > 0) {
        if (n == 3)
            c += w[2];
        if (n >= 2)
            b += w[1];
        a += w[0];
        c ^= b; c -= ROL32(b, 14);
        a ^= c; a -= ROL32(c, 11);
        b ^= a; b -= ROL32(a, 25);
        c ^= b; c -= ROL32(b, 16);
        a ^= c; a -= ROL32(c, 4);
        b ^= a; b -= ROL32(a, 14);
        c ^= b; c -= ROL32(b, 24);
    }
    return PyLong_FromUnsignedLong(c);
}

static PyMethodDef methods[] = {
    {"run", (PyCFunction)(void (*)(void))run, METH_FASTCALL,
     "run(ring, iov, iov0, slot, count, frame_size, now, confirmed, next, timeouts) -> slots handled"},
    {"client_hash", (PyCFunction)(void (*)(void))client_hash, METH_FASTCALL,
     "client_hash(addr, port or None, seed) -> glb.hashing.client_hash's 32 bits"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "director.dataplane._fastpath", NULL, -1, methods};

PyMODINIT_FUNC PyInit__fastpath(void)
{
    struct {
        PyObject **slot;
        const char *name;
    } names[] = {
        {&s_expires, "expires"}, {&s_state, "state"},     {&s_dest, "dest"},       {&s_available, "available"},
        {&s_tx, "tx"},           {&s_tag, "tag"},         {&s_live, "live"},       {&s_packets, "packets"},
        {&s_bytes, "bytes"},     {&s_move_to_end, "move_to_end"},
    };
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        if ((*names[i].slot = PyUnicode_InternFromString(names[i].name)) == NULL)
            return NULL;
    }
    return PyModule_Create(&module);
}
