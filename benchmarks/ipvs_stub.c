/* LD_PRELOAD stub for benchmarks/health_scale.sh: lets keepalived's checker run
 * on a kernel without IPVS. keepalived's libipvs falls back from generic netlink
 * to the IP_VS_SO_* socket options on a raw socket; this answers those as an
 * empty IPVS would (version 1.2.1, no services) and accepts every change
 * without doing anything. keepalived's health checkers are untouched: they
 * connect to the real servers exactly as they would with IPVS present. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <string.h>
#include <sys/socket.h>
#include <netinet/in.h>
#include <linux/ip_vs.h>

static int ipvs_opt(int level, int optname) {
    return level == IPPROTO_IP && optname >= IP_VS_BASE_CTL && optname <= IP_VS_SO_SET_MAX;
}

int setsockopt(int fd, int level, int optname, const void *val, socklen_t len) {
    static int (*real)(int, int, int, const void *, socklen_t);
    if (ipvs_opt(level, optname))
        return 0;
    if (!real)
        real = dlsym(RTLD_NEXT, "setsockopt");
    return real(fd, level, optname, val, len);
}

int getsockopt(int fd, int level, int optname, void *val, socklen_t *len) {
    static int (*real)(int, int, int, void *, socklen_t *);
    if (ipvs_opt(level, optname) && val && len) {
        memset(val, 0, *len);
        if (optname == IP_VS_SO_GET_VERSION) {
            strncpy(val, "IP Virtual Server version 1.2.1 (size=4096)", *len - 1);
        } else if (optname == IP_VS_SO_GET_INFO && *len >= sizeof(struct ip_vs_getinfo)) {
            struct ip_vs_getinfo *info = val;
            info->version = 0x010201;
            info->size = 4096;
        }
        return 0;
    }
    if (!real)
        real = dlsym(RTLD_NEXT, "getsockopt");
    return real(fd, level, optname, val, len);
}
