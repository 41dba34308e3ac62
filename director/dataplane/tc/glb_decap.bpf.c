// SPDX-License-Identifier: GPL-2.0
/*
 * GLB's real-server decapsulator: IP-in-IP from a TUN-mode director
 * unwrapped at tc ingress (tcx or clsact, direct-action) on a real server whose
 * kernel has no ipip/ip6_tunnel driver.
 *
 * For a frame sent to this host's MAC carrying IPv4 or IPv6 whose protocol /
 * next header is 4 (IPv4 inside) or 41 (IPv6 inside), it makes the checks
 * director/realserver/decapsulate.py makes (inner version matching the outer
 * protocol number, sane lengths, IPv4 header checksums, inner destination
 * one of the VIPs Python wrote into `decap_vips4`/`decap_vips6`, no nested
 * tunnel), removes the outer header with bpf_skb_adjust_room (the MAC header
 * moves up; a GSO frame stays whole: FIXED_GSO keeps the inner segment size,
 * which the outer header never changed) and hands the inner packet to the
 * stack, which delivers it to the VIP held on lo. It never drops: a packet it
 * does not decapsulate passes untouched (the kernel then does what it does
 * with an unknown protocol), counted by reason in `decap_counters`, whose
 * indices are decapsulate.py's reason codes (director/realserver/bpfdecap.py
 * names them). Outer fragments pass untouched too: the program sees them
 * before reassembly. tests/director/realserver/test_bpfdecap_golden.py holds
 * this file and decapsulate.py to one golden table with BPF_PROG_TEST_RUN.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

/* Linux 6.3 uapi; Debian's libbpf-dev headers may predate them. */
#ifndef BPF_F_ADJ_ROOM_DECAP_L3_IPV4
#define BPF_F_ADJ_ROOM_DECAP_L3_IPV4 (1ULL << 7)
#define BPF_F_ADJ_ROOM_DECAP_L3_IPV6 (1ULL << 8)
#endif

#define PACKET_HOST 0 /* skb->pkt_type: the frame is for this host's MAC */

/* The counters' indices: 0-5 are decapsulate.py's reason codes, the rest this program's own. */
enum counter {
	C_DELIVERED = 0,
	C_TRUNCATED = 1,
	C_BAD_HEADER = 2,
	C_BAD_CHECKSUM = 3,
	C_NOT_VIP = 4,
	C_NESTED = 5,
	/* 6 is the userspace decapsulator's tun_write_error */
	C_RECEIVED = 7,       /* tunnelled packets for this host, before the checks */
	C_OUTER_FRAGMENT = 8, /* a fragment of the outer packet: left to the kernel's reassembly */
	C_ADJUST_FAILED = 9,  /* bpf_skb_adjust_room refused: passed untouched */
	C_MAX = 16,
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, C_MAX);
	__type(key, __u32);
	__type(value, __u64);
} decap_counters SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u32); /* network order */
	__type(value, __u8);
} decap_vips4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, struct in6_addr);
	__type(value, __u8);
} decap_vips6 SEC(".maps");

static __always_inline int count(enum counter c)
{
	__u32 key = c;
	__u64 *v = bpf_map_lookup_elem(&decap_counters, &key);

	if (v)
		*v += 1;
	return TC_ACT_OK;
}

/*
 * The headers are read in place (skb->data .. data_end), not copied out with
 * bpf_skb_load_bytes: the outer and the inner header, at most HEADERS bytes,
 * are in the linear part on veth and the usual drivers (a GSO frame's linear
 * part is its headers); where they are not, one bpf_skb_pull_data puts them
 * there (a failed pull leaves them short: declined as truncated). Bounds are
 * checked against data_end before every read, as the verifier requires.
 */
#define HEADERS (ETH_HLEN + 60 + 60)

/* Whether the IPv4 header of `ihl` bytes (20..60) at `hdr` sums to 0xFFFF (ones' complement). */
static __always_inline int ip4_checksum_ok(const __u16 *hdr, __u32 ihl, const void *data_end)
{
	__u32 sum = 0;

	if (ihl < 20 || ihl > 60)
		return 0;
	for (int i = 0; i < 30; i++) {
		if (i * 2 >= ihl)
			break;
		const __u16 *w = hdr + i;

		/* Opaque to the compiler, which would otherwise fold the check into arithmetic on
		 * data_end, which the verifier refuses. */
		asm volatile("" : "+r"(w));
		if ((const void *)(w + 1) > data_end)
			return 0;
		sum += *w;
	}
	sum = (sum & 0xFFFF) + (sum >> 16);
	sum = (sum & 0xFFFF) + (sum >> 16);
	return sum == 0xFFFF;
}

/* decapsulate.py's checks of the inner packet at `inner`, `avail` bytes long; C_DELIVERED if it may go in. */
static __always_inline enum counter check_inner(const void *inner, const void *data_end, __u32 avail,
						__u8 inner_proto)
{
	if (inner_proto == IPPROTO_IPIP) {
		const struct iphdr *ip = inner;

		if (avail < 20)
			return C_TRUNCATED;
		if ((const void *)(ip + 1) > data_end)
			return C_TRUNCATED;
		__u32 ihl = ip->ihl * 4;
		__u32 total = bpf_ntohs(ip->tot_len);

		if (ip->version != 4 || ihl < 20)
			return C_BAD_HEADER;
		if (ihl > avail)
			return C_TRUNCATED;
		if (total < ihl)
			return C_BAD_HEADER;
		if (total > avail)
			return C_TRUNCATED;
		if (!ip4_checksum_ok(inner, ihl, data_end))
			return C_BAD_CHECKSUM;
		__u32 daddr = ip->daddr;

		if (!bpf_map_lookup_elem(&decap_vips4, &daddr))
			return C_NOT_VIP;
		if (ip->protocol == IPPROTO_IPIP || ip->protocol == IPPROTO_IPV6)
			return C_NESTED;
		return C_DELIVERED;
	}
	const struct ipv6hdr *ip6 = inner;

	if (avail < 40)
		return C_TRUNCATED;
	if ((const void *)(ip6 + 1) > data_end)
		return C_TRUNCATED;
	__u32 plen = bpf_ntohs(ip6->payload_len);

	if (ip6->version != 6 || plen == 0) /* 0: a jumbogram, nothing a director sends */
		return C_BAD_HEADER;
	if (40 + plen > avail)
		return C_TRUNCATED;
	struct in6_addr daddr = ip6->daddr;

	if (!bpf_map_lookup_elem(&decap_vips6, &daddr))
		return C_NOT_VIP;
	if (ip6->nexthdr == IPPROTO_IPIP || ip6->nexthdr == IPPROTO_IPV6)
		return C_NESTED;
	return C_DELIVERED;
}

SEC("tc")
int glb_decap(struct __sk_buff *skb)
{
	__u32 outer, avail;
	__u8 proto;

	if (skb->pkt_type != PACKET_HOST)
		return TC_ACT_OK;
	if (skb->protocol != bpf_htons(ETH_P_IP) && skb->protocol != bpf_htons(ETH_P_IPV6))
		return TC_ACT_OK;
	if ((void *)(long)skb->data + (skb->len < HEADERS ? skb->len : HEADERS) > (void *)(long)skb->data_end)
		bpf_skb_pull_data(skb, skb->len < HEADERS ? skb->len : HEADERS);
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;

	if (skb->protocol == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = data + ETH_HLEN;

		if ((void *)(ip + 1) > data_end)
			return TC_ACT_OK;
		if (ip->version != 4 || (ip->protocol != IPPROTO_IPIP && ip->protocol != IPPROTO_IPV6))
			return TC_ACT_OK;
		count(C_RECEIVED);
		if (ip->frag_off & bpf_htons(0x3FFF))
			return count(C_OUTER_FRAGMENT);
		outer = ip->ihl * 4;
		__u32 total = bpf_ntohs(ip->tot_len);

		if (outer < 20 || total < outer)
			return count(C_BAD_HEADER);
		if (ETH_HLEN + total > skb->len)
			return count(C_TRUNCATED);
		if (!ip4_checksum_ok((const __u16 *)ip, outer, data_end)) /* ip_rcv would have; we remove it first */
			return count(C_BAD_CHECKSUM);
		avail = total - outer;
		proto = ip->protocol;
	} else {
		struct ipv6hdr *ip6 = data + ETH_HLEN;

		if ((void *)(ip6 + 1) > data_end)
			return TC_ACT_OK;
		/* Only a tunnel right after the fixed header: extension headers are left to the kernel. */
		if (ip6->version != 6 || (ip6->nexthdr != IPPROTO_IPIP && ip6->nexthdr != IPPROTO_IPV6))
			return TC_ACT_OK;
		count(C_RECEIVED);
		outer = 40;
		avail = bpf_ntohs(ip6->payload_len);
		if (avail == 0)
			return count(C_BAD_HEADER);
		if (ETH_HLEN + outer + avail > skb->len)
			return count(C_TRUNCATED);
		proto = ip6->nexthdr;
	}
	if (outer > 60)
		return count(C_BAD_HEADER); /* ihl * 4 is at most 60: for the verifier's bounds */

	enum counter verdict = check_inner(data + ETH_HLEN + outer, data_end, avail, proto);

	if (verdict != C_DELIVERED)
		return count(verdict);
	/* The DECAP flag sets skb->protocol to the inner family when it differs from the outer one. */
	__u64 flags = BPF_F_ADJ_ROOM_FIXED_GSO |
		      (proto == IPPROTO_IPIP ? BPF_F_ADJ_ROOM_DECAP_L3_IPV4 : BPF_F_ADJ_ROOM_DECAP_L3_IPV6);

	if (bpf_skb_adjust_room(skb, -(__s32)outer, BPF_ADJ_ROOM_MAC, flags))
		return count(C_ADJUST_FAILED);
	/* adjust_room moved the MAC header: packet pointers are read again. */
	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;

	if ((void *)(eth + 1) > data_end)
		return count(C_ADJUST_FAILED);
	eth->h_proto = proto == IPPROTO_IPIP ? bpf_htons(ETH_P_IP) : bpf_htons(ETH_P_IPV6);
	return count(C_DELIVERED);
}

char LICENSE[] SEC("license") = "GPL";
