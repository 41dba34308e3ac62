// SPDX-License-Identifier: GPL-2.0
/*
 * GLB's kernel data plane: established flows of DR and TUN forwarded at tc
 * ingress (clsact, direct-action), IPv4 and IPv6.
 *
 * It makes exactly the decision Forwarder.fast() makes in Python
 * (director/dataplane/forwarder.py) and nothing more: a TCP/UDP packet
 * (IPv4 without options, IPv6 without extension headers, not a fragment) of
 * a flow Python installed in `conns`, not expired, whose route is usable,
 * with the TCP state change its flags make (NEXT[state][flags], the table
 * Python writes into `next_state`) applied on a DR or TUN route
 * (ROUTE_TRACK) but a SYN reusing a closing flow. Everything else is left
 * untouched for the userspace engine, through the slow-path veth it reads
 * (see leave()), or to the host when it is not the engine's: new flows and
 * every scheduler, NAT's state changes, ICMP, ARP/NDP, fragments, packets too big
 * for the tunnel. New flows of mh, sh and dh are the exception: the program
 * schedules those itself from Python's lookup tables and, for a service with
 * persistence, its copy of Python's templates (see new_flow()). tests/director/dataplane/test_kernel_golden.py holds this file to
 * the golden table and to the Python forwarder with BPF_PROG_TEST_RUN.
 *
 * The map layout is director/dataplane/kernelmaps.py's: keep both in step
 * (the loader compares every map's key and value sizes with it).
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define PACKET_OTHERHOST 3 /* skb->pkt_type */
#define PACKET_OUTGOING 4

#define MODE_NONE 0 /* unreachable: userspace decides (and counts no_neighbour) */
#define MODE_DR 1
#define MODE_TUN 2
#define MODE_NAT 3 /* LVS-NAT: the client's packets DNAT'd here, the real server's replies SNAT'd (reply_nat) */

#define ROUTE_LIVE 1 /* the server is available and its VIP in the plan */
#define ROUTE_TRACK 4 /* the program applies its flows' TCP state changes (DR, TUN; told through flow_events) */

/* IPVS's 11 TCP states and UDP; rows for 16 so that an index is bounded by a mask */
#define STATES 16
#define MAX_ROUTES 65536

/* Why a packet went where it went; the index of `reasons`. */
enum reason {
	R_DR = 0,        /* forwarded, MACs rewritten */
	R_TUN,           /* forwarded, encapsulated */
	R_NOT_IP,        /* not IPv4/IPv6 (ARP, VLAN, ...) */
	R_NOT_SIMPLE,    /* IP options, fragment, extension headers, not TCP/UDP, truncated */
	R_NO_FLOW,       /* not in `conns` (new flow, or not a VIP) */
	R_EXPIRED,       /* the entry's expiry passed */
	R_STATE,         /* the TCP flags change the flow's state */
	R_ROUTE_DOWN,    /* server down, VIP gone, or unreachable */
	R_TOO_BIG,       /* does not fit the tunnel */
	R_FAMILY,        /* flow and tunnel of different families */
	R_ERROR,         /* a helper failed: userspace gets the (untouched) packet */
	R_OTHER_HOST,    /* for another host's MAC (promiscuous mode, a flooding switch): never ours */
	R_NAT,           /* a client's packet forwarded, DNAT'd to the real server */
	R_NAT_REPLY,     /* a real server's reply forwarded, SNAT'd back to the VIP */
	R_NEW,           /* a new flow the program scheduled (mh, sh, dh) and installed; also counted forwarded */
	R_TRACKED,       /* a TCP state change the program applied (ROUTE_TRACK); also counted forwarded */
	R_TEMPLATE,      /* a persistence template expired (it may still control connections) or no room for one */
	R_MAX,
};

/*
 * The connection table's key and value are kept small: at 1M entries the LRU
 * hash's own element header and buckets are ~65 bytes an entry, so 24 + 8
 * bytes here keep an entry under 100 (docs/benchmarks.md). The VIP is its id
 * in `vips` rather than its address; the expiry is in ticks of 2^20 ns
 * (~1.05 ms) in 32 bits, compared modulo 2^32 (valid for timeouts < 24 days).
 */
#define TICK_SHIFT 20

struct flow_key {
	__u8 proto;
	__u8 family;  /* 4 or 6 */
	__u16 vip;    /* the VIP's id (`vips` value) */
	__u16 sport;  /* network order, as on the wire */
	__u16 dport;
	__u8 src[16]; /* client; IPv4 in the first 4 bytes, the rest zero */
};

/* struct flow's flags */
#define FLOW_KERNEL 1  /* made or moved to another state here (hash schedulers); Python's view may lag */
#define FLOW_TWO_WAY 2 /* NAT: the state moves by IPVS's INPUT table (`nat_next_state`), not INPUT-ONLY */

struct flow {
	__u16 route;   /* index in `routes` */
	__u8 state;    /* IPVS state (conntable.py's numbers) */
	__u8 flags;    /* FLOW_KERNEL, FLOW_TWO_WAY */
	__u32 expires; /* CLOCK_MONOTONIC >> TICK_SHIFT, modulo 2^32 (the program reads the coarse clock) */
};

struct route {
	__u8 dst_mac[6]; /* DR: the real server's; TUN: the next hop's */
	__u8 src_mac[6]; /* the director's */
	__u8 mode;
	__u8 family;     /* TUN: the tunnel's */
	__u8 flags;
	__u8 pad;
	__u32 ifindex;   /* out of here; 0 = the interface the packet came in on */
	__u16 max_inner; /* TUN: the largest inner packet that fits */
	__u16 port;      /* NAT: the real server's port, network order (0: the VIP's) */
	__u8 saddr[16];  /* TUN outer source (the director) */
	__u8 daddr[16];  /* TUN outer destination, NAT new destination: the real server */
	__u32 server;    /* the real server's id in its service (kernelmaps.server_id): persistence templates name it */
};

struct vip_key {
	__u8 family; /* 4 or 6 */
	__u8 pad[3];
	__u8 addr[16];
};

#define VIP_LIVE 1 /* in this director's plan and owned: its frames are the engine's, its flows forwarded */

struct vip {
	__u16 id;    /* stable for the VIP's life in the maps: flows are keyed by it */
	__u8 flags;
	__u8 pad;
};

struct counter {
	__u64 packets;
	__u64 bytes; /* IP length of the inner packet, as the Python counters */
};

struct timeouts {
	__u64 ns[STATES];
};

struct next_state {
	__u8 next[STATES * 256];
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 1 << 20); /* the loader sets connection_table.max_entries */
	__type(key, struct flow_key);
	__type(value, struct flow);
} conns SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, MAX_ROUTES);
	__type(key, __u32);
	__type(value, struct route);
} routes SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, MAX_ROUTES);
	__type(key, __u32);
	__type(value, struct counter);
} route_counters SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, R_MAX);
	__type(key, __u32);
	__type(value, __u64);
} reasons SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct timeouts);
} timeouts SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct next_state);
} next_state SEC(".maps");

/* The VIPs: their ids (flow keys hold them) and whether they are live (which frames the engine needs). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, struct vip_key);
	__type(value, struct vip);
} vips SEC(".maps");

/* The slow-path veth's ifindex (0: none, frames the program leaves go to the host). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} slowpath SEC(".maps");

/*
 * Python's alone (the program never reads them); maps, so that they are pinned
 * with the rest: the layout's id of each group of maps (a director reuses a
 * group's pinned maps only when it matches; kernelmaps.GROUPS) and each
 * route's identity (a hash of its server and VIP), so a restarted director
 * finds the routes its predecessor's flows hold.
 */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 8);
	__type(key, __u32);
	__type(value, __u64);
} layout SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, MAX_ROUTES);
	__type(key, __u32);
	__type(value, __u64);
} route_ids SEC(".maps");

/* The outer IPv4 id, per CPU (the engine keeps one per worker). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} ident SEC(".maps");

/*
 * LVS-NAT (director/modes/nat.py). The client's packets find their flow in
 * `conns` as DR/TUN ones do; the real server's replies find it through
 * `nat_replies`, keyed as the reply carries it, which also says where the
 * reply goes. `nat_next_state` holds IPVS's two-way tables (0: INPUT, the
 * client's packets; 1: OUTPUT, the server's), `route_out_counters` the
 * replies per route (ipvsadm's OutPkts), `nat_sources` the NAT real servers'
 * addresses (their frames are the engine's when not forwarded here), and
 * `slowpaths` the slow-path veth of each interface the program is attached
 * to besides the first (the LAN side of a two-interface director).
 */
struct reply_key {
	__u8 proto;
	__u8 family;
	__u16 pad;
	__u16 sport;  /* the real server's port, network order */
	__u16 dport;  /* the client's */
	__u8 src[16]; /* the real server */
	__u8 dst[16]; /* the client */
};

struct nat_reply {
	struct flow_key flow; /* the flow in `conns` */
	__u8 vip[16];         /* the new source; the flow key's dport is the new source port */
	__u8 eth[12];         /* destination (the client or its router) and source (the director) MACs */
	__u32 ifindex;        /* out of here: the client side */
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 1 << 16); /* the loader sets connection_table.max_entries (kernelmaps.sized) */
	__type(key, struct reply_key);
	__type(value, struct nat_reply);
} nat_replies SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, struct next_state);
} nat_next_state SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, MAX_ROUTES);
	__type(key, __u32);
	__type(value, struct counter);
} route_out_counters SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, struct vip_key);
	__type(value, __u32);
} nat_sources SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16);
	__type(key, __u32);
	__type(value, __u32);
} slowpaths SEC(".maps");

static __always_inline int count(__u32 reason, int verdict)
{
	__u64 *n = bpf_map_lookup_elem(&reasons, &reason);

	if (n)
		*n += 1;
	return verdict;
}

static __always_inline __u16 csum_fold(__u32 sum)
{
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)~sum;
}

/*
 * Only the MACs change: the IP packet, its checksums and GSO stay valid.
 * Written directly: decide() read the headers in the linear part, which the
 * verifier's prologue for a program that writes packets has made writable.
 */
static __always_inline int forward_dr(struct __sk_buff *skb, struct route *r)
{
	void *data = (void *)(long)skb->data;

	if (data + ETH_HLEN > (void *)(long)skb->data_end)
		return count(R_ERROR, TC_ACT_OK);
	__builtin_memcpy(data, r->dst_mac, 12);
	count(R_DR, 0);
	return bpf_redirect(r->ifindex ? r->ifindex : skb->ifindex, 0);
}

/*
 * IP-in-IP as codec.Tunnel builds it (IPVS's ip_vs_tunnel_xmit): IPv4 in
 * IPv4 with the inner TOS, TTL and DF, an id from a counter; IPv6 in IPv6
 * with the inner traffic class and hop limit, flow label 0. Room is made
 * after the MAC header with the encap flags, so the kernel marks a GSO
 * frame as a tunnel's and shrinks its segment size by the outer header:
 * large segments stay whole and still fit the link once segmented.
 */
static __always_inline int forward_tun(struct __sk_buff *skb, struct route *r, __u32 total,
				       __u8 family, __u8 tos, __u8 ttl, __u16 frag_off)
{
	__u32 room = family == 4 ? sizeof(struct iphdr) : sizeof(struct ipv6hdr);
	__u64 flags = family == 4 ? BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 : BPF_F_ADJ_ROOM_ENCAP_L3_IPV6;

	/* Ethernet padding is not part of the inner packet (codec.Tunnel drops it too). */
	if (skb->len > ETH_HLEN + total && bpf_skb_change_tail(skb, ETH_HLEN + total, 0))
		return count(R_ERROR, TC_ACT_OK);
	if (bpf_skb_adjust_room(skb, room, BPF_ADJ_ROOM_MAC, flags))
		return count(R_ERROR, TC_ACT_OK);

	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;

	if (family == 4) {
		struct iphdr *ip = data + ETH_HLEN;

		/* the packet already has its room: it cannot go back to userspace as it came */
		if ((void *)(ip + 1) > data_end)
			return count(R_ERROR, TC_ACT_SHOT);
		__builtin_memcpy(eth->h_dest, r->dst_mac, 6);
		__builtin_memcpy(eth->h_source, r->src_mac, 6);
		__u32 key = 0;
		__u32 *id = bpf_map_lookup_elem(&ident, &key);
		__u16 next = 0;

		if (id) {
			*id = (*id + 1) & 0xffff;
			next = *id;
		}
		ip->version = 4;
		ip->ihl = 5;
		ip->tos = tos;
		ip->tot_len = bpf_htons(total + sizeof(struct iphdr));
		ip->id = bpf_htons(next);
		ip->frag_off = frag_off & bpf_htons(0x4000); /* DF copied, nothing else */
		ip->ttl = ttl;
		ip->protocol = IPPROTO_IPIP;
		ip->check = 0;
		__builtin_memcpy(&ip->saddr, r->saddr, 4);
		__builtin_memcpy(&ip->daddr, r->daddr, 4);
		__u16 *w = (__u16 *)ip;
		__u32 sum = 0;
#pragma unroll
		for (int i = 0; i < 10; i++)
			sum += w[i];
		ip->check = csum_fold(sum);
	} else {
		struct ipv6hdr *ip6 = data + ETH_HLEN;
		__u8 *b = (__u8 *)ip6;

		if ((void *)(ip6 + 1) > data_end)
			return count(R_ERROR, TC_ACT_SHOT);
		__builtin_memcpy(eth->h_dest, r->dst_mac, 6);
		__builtin_memcpy(eth->h_source, r->src_mac, 6);

		b[0] = 0x60 | (tos >> 4);
		b[1] = (tos & 0x0f) << 4;
		b[2] = 0;
		b[3] = 0;
		ip6->payload_len = bpf_htons(total);
		ip6->nexthdr = IPPROTO_IPV6;
		ip6->hop_limit = ttl;
		__builtin_memcpy(&ip6->saddr, r->saddr, 16);
		__builtin_memcpy(&ip6->daddr, r->daddr, 16);
	}
	count(R_TUN, 0);
	return bpf_redirect(r->ifindex ? r->ifindex : skb->ifindex, 0);
}

/* One packet of `total` IP bytes on a route's per-CPU counters. */
static __always_inline int count_route(void *counters, __u32 ri, __u32 total)
{
	struct counter *c = bpf_map_lookup_elem(counters, &ri);

	if (c) {
		c->packets += 1;
		c->bytes += total;
	}
	return 0;
}

/*
 * What a checksum gains when n 16-bit words change from old to new (RFC
 * 1624's ~m + m'), summed inline: an IPv4 address is 2 words, an IPv6 one 8
 * (< 2^20, no carry is lost in 32 bits).
 */
static __always_inline __u32 csum_change(__u16 *old, __u16 *new, int words)
{
	__u32 sum = 0;

#pragma unroll
	for (int i = 0; i < 8; i++)
		if (i < words)
			sum += (__u16)~old[i] + new[i];
	return sum;
}

/*
 * One address and one port of a TCP/UDP packet replaced, checksums kept
 * valid (nat.translate's rewrite). The L4 checksum goes through the
 * kernel's helper, over the pseudo-header (BPF_F_PSEUDO_HDR) and the port:
 * it knows a CHECKSUM_PARTIAL skb (veth, virtio: the field holds the
 * pseudo-header sum only) and then folds in the address alone; an IPv4 UDP
 * checksum of 0 (none) stays 0 (BPF_F_MARK_MANGLED_0). The rest is written
 * directly into the packet, which that helper has made writable: the IPv4
 * header checksum (never partial) incrementally, the address, the port and
 * the MACs: one helper call per packet (two with a mapped port) instead of
 * six or seven (docs/benchmarks.md). ``dst``: the destination (client -> server) or the
 * source (server -> client).
 */
static __always_inline int rewrite(struct __sk_buff *skb, __u8 family, __u8 proto, int dst,
				   __u8 *old, __u8 *new, __u16 old_port, __u16 new_port, __u8 *eth)
{
	__u32 l4 = ETH_HLEN + (family == 4 ? sizeof(struct iphdr) : sizeof(struct ipv6hdr));
	__u32 coff = l4 + (proto == IPPROTO_TCP ? 16 : 6);
	__u64 mangled = proto == IPPROTO_UDP && family == 4 ? BPF_F_MARK_MANGLED_0 : 0;
	__u32 diff = csum_change((__u16 *)old, (__u16 *)new, family == 4 ? 2 : 8);

	if (bpf_l4_csum_replace(skb, coff, 0, diff, BPF_F_PSEUDO_HDR | mangled))
		return -1;
	if (old_port != new_port && bpf_l4_csum_replace(skb, coff, old_port, new_port, sizeof(__u16) | mangled))
		return -1;

	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	__u16 *ports;

	if (family == 4) {
		struct iphdr *ip = data + ETH_HLEN;

		ports = (__u16 *)(ip + 1);
		if ((void *)(ports + 2) > data_end)
			return -1;
		ip->check = csum_fold((__u16)~ip->check + diff);
		if (dst)
			__builtin_memcpy(&ip->daddr, new, 4);
		else
			__builtin_memcpy(&ip->saddr, new, 4);
	} else {
		struct ipv6hdr *ip6 = data + ETH_HLEN;

		ports = (__u16 *)(ip6 + 1);
		if ((void *)(ports + 2) > data_end)
			return -1;
		if (dst)
			__builtin_memcpy(&ip6->daddr, new, 16);
		else
			__builtin_memcpy(&ip6->saddr, new, 16);
	}
	if (dst)
		ports[1] = new_port;
	else
		ports[0] = new_port;
	__builtin_memcpy(data, eth, 12);
	return 0;
}

/*
 * The frame's first n bytes (all of it, if shorter) in the skb's linear
 * part, where the program reads them directly (skb->data .. data_end)
 * instead of copying them out with bpf_skb_load_bytes. Veth and the usual
 * drivers put the headers there (a GSO frame's linear part is its headers),
 * so the pull, which may copy the packet, is rare. 1 if it pulled: every
 * packet pointer must then be read again. A pull that fails leaves the
 * headers short, and the parse declines the frame as truncated.
 */
static __always_inline int linear(struct __sk_buff *skb, __u32 n)
{
	__u32 want = skb->len < n ? skb->len : n;

	if ((void *)(long)skb->data + want <= (void *)(long)skb->data_end)
		return 0;
	bpf_skb_pull_data(skb, want);
	return 1;
}

/* What decide() reads after the Ethernet header: the IP header, then TCP up to its flags (UDP's header is shorter). */
#define IP4_HEADERS (ETH_HLEN + sizeof(struct iphdr) + 14)
#define IP6_HEADERS (ETH_HLEN + sizeof(struct ipv6hdr) + 14)

/* What the decision reads of a packet. */
struct pkt {
	struct flow_key key;
	struct vip_key vip; /* the destination, looked up for the VIP's id */
	__u32 total;  /* IP length */
	__u8 flags;   /* TCP flags; 0 for UDP */
	__u8 family;
	__u8 tos;     /* IPv4 TOS / IPv6 traffic class */
	__u8 ttl;     /* TTL / hop limit */
	__u16 frag_off;
	__u8 live;    /* the destination is a live VIP (key.vip set) */
	__u8 next;    /* the flow's state after this packet (a change only on a ROUTE_TRACK route) */
};

/*
 * Forwarder.fast()'s decision, without side effects: R_DR or R_TUN with the
 * flow, its route and its index set, or the reason userspace must decide.
 */
static __always_inline __u32 decide(struct __sk_buff *skb, struct pkt *p, __u64 now,
				    struct flow **fp, struct route **rp, __u32 *ri)
{
	__u32 hlen;
	__u8 proto;
	void *l4;

	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;

	if ((void *)(eth + 1) > data_end)
		return R_NOT_IP;
	__u16 proto_eth = eth->h_proto;

	if (proto_eth == bpf_htons(ETH_P_IP)) {
		if (linear(skb, IP4_HEADERS)) {
			data = (void *)(long)skb->data;
			data_end = (void *)(long)skb->data_end;
		}
		struct iphdr *ip = data + ETH_HLEN;

		if ((void *)(ip + 1) > data_end)
			return R_NOT_SIMPLE;
		/* no options; neither MF nor an offset (DF may be set) */
		if (ip->version != 4 || ip->ihl != 5 || (ip->frag_off & bpf_htons(0x3fff)))
			return R_NOT_SIMPLE;
		p->total = bpf_ntohs(ip->tot_len);
		hlen = sizeof(*ip);
		proto = ip->protocol;
		p->key.family = 4;
		__builtin_memcpy(p->key.src, &ip->saddr, 4);
		__builtin_memcpy(p->vip.addr, &ip->daddr, 4);
		p->tos = ip->tos;
		p->ttl = ip->ttl;
		p->frag_off = ip->frag_off;
		l4 = ip + 1;
	} else if (proto_eth == bpf_htons(ETH_P_IPV6)) {
		if (linear(skb, IP6_HEADERS)) {
			data = (void *)(long)skb->data;
			data_end = (void *)(long)skb->data_end;
		}
		struct ipv6hdr *ip6 = data + ETH_HLEN;

		if ((void *)(ip6 + 1) > data_end || ip6->version != 6)
			return R_NOT_SIMPLE;
		p->total = sizeof(*ip6) + bpf_ntohs(ip6->payload_len);
		hlen = sizeof(*ip6);
		proto = ip6->nexthdr; /* extension headers and ICMPv6 are declined below */
		p->key.family = 6;
		__builtin_memcpy(p->key.src, &ip6->saddr, 16);
		__builtin_memcpy(p->vip.addr, &ip6->daddr, 16);
		p->tos = (ip6->priority << 4) | (ip6->flow_lbl[0] >> 4);
		p->ttl = ip6->hop_limit;
		l4 = ip6 + 1;
	} else {
		return R_NOT_IP;
	}
	/* TCP up to its flags, UDP up to its length, both inside the IP packet and the frame */
	if (proto != IPPROTO_TCP && proto != IPPROTO_UDP)
		return R_NOT_SIMPLE;
	if (p->total < hlen + (proto == IPPROTO_TCP ? 14 : 8) || ETH_HLEN + p->total > skb->len)
		return R_NOT_SIMPLE;
	if (proto == IPPROTO_TCP) {
		if (l4 + 14 > data_end)
			return R_NOT_SIMPLE;
		p->flags = ((__u8 *)l4)[13];
	} else if (l4 + 8 > data_end) {
		return R_NOT_SIMPLE;
	}
	p->key.proto = proto;
	__builtin_memcpy(&p->key.sport, l4, 4);
	p->family = p->vip.family = p->key.family;

	struct vip *v = bpf_map_lookup_elem(&vips, &p->vip);
	if (!v || !(v->flags & VIP_LIVE))
		return R_NO_FLOW;
	p->key.vip = v->id;
	p->live = 1;
	struct flow *f = bpf_map_lookup_elem(&conns, &p->key);
	if (!f)
		return R_NO_FLOW;
	if ((__s32)(f->expires - (__u32)(now >> TICK_SHIFT)) <= 0)
		return R_EXPIRED;
	__u32 zero = 0;
	__u32 state = f->state & (STATES - 1);
	struct next_state *ns = (f->flags & FLOW_TWO_WAY) ? bpf_map_lookup_elem(&nat_next_state, &zero)
					   : bpf_map_lookup_elem(&next_state, &zero);
	if (!ns)
		return R_ERROR;
	__u8 next = ns->next[state * 256 + p->flags];
	*ri = f->route;
	struct route *r = bpf_map_lookup_elem(&routes, ri);
	/* a state change is Python's unless the route says the program tracks it (not a SYN reusing the flow) */
	if (next != state && (next >= STATES || !r || !(r->flags & ROUTE_TRACK)))
		return R_STATE;
	p->next = next;
	if (!r || !(r->flags & ROUTE_LIVE) || r->mode == MODE_NONE)
		return R_ROUTE_DOWN;
	if (r->mode == MODE_TUN && p->family != r->family)
		return R_FAMILY;
	if (r->mode == MODE_TUN && !skb->gso_size && p->total > r->max_inner)
		return R_TOO_BIG;
	*fp = f;
	*rp = r;
	if (r->mode == MODE_NAT)
		return p->family == r->family ? R_NAT : R_FAMILY;
	return r->mode == MODE_DR ? R_DR : R_TUN;
}

/* Ethernet padding is not part of the packet (nat.translate drops it too). */
static __always_inline int trim(struct __sk_buff *skb, __u32 total)
{
	return skb->len > ETH_HLEN + total ? bpf_skb_change_tail(skb, ETH_HLEN + total, 0) : 0;
}

/* A client's packet to VIP:vport: to the real server's address and port, from the director's LAN side. */
static __always_inline int forward_nat(struct __sk_buff *skb, struct route *r, struct pkt *p)
{
	__u16 port = r->port ? r->port : p->key.dport;

	if (trim(skb, p->total))
		return count(R_ERROR, TC_ACT_OK);
	if (rewrite(skb, p->family, p->key.proto, 1, p->vip.addr, r->daddr, p->key.dport, port, r->dst_mac))
		return count(R_ERROR, TC_ACT_SHOT); /* half rewritten: it cannot go on as it came */
	count(R_NAT, 0);
	return bpf_redirect(r->ifindex ? r->ifindex : skb->ifindex, 0);
}

#define NOT_MINE -1

/*
 * A real server's reply of a NAT flow (not to a VIP: decide() said R_NO_FLOW
 * with the packet parsed): its source back to VIP:vport, to the client's
 * MAC, out of the client side; counted on the route's out counters. The same
 * conditions as a client's packet (flow live, OUTPUT table changes nothing,
 * route up), else NOT_MINE with the reason in *why: the engine decides (and
 * drops and counts a reply it has no connection for).
 */
static __always_inline int reply_nat(struct __sk_buff *skb, struct pkt *p, __u64 now, __u32 *why)
{
	struct vip_key src = {.family = p->family};
	struct reply_key rk = {.proto = p->key.proto, .family = p->family,
			       .sport = p->key.sport, .dport = p->key.dport};
	__u32 one = 1, zero = 0;

	__builtin_memcpy(src.addr, p->key.src, 16);
	if (!bpf_map_lookup_elem(&nat_sources, &src))
		return NOT_MINE;
	__builtin_memcpy(rk.src, p->key.src, 16);
	__builtin_memcpy(rk.dst, p->vip.addr, 16);
	struct nat_reply *n = bpf_map_lookup_elem(&nat_replies, &rk);
	if (!n)
		return NOT_MINE;
	struct vip_key vk = {.family = p->family};

	__builtin_memcpy(vk.addr, n->vip, 16);
	struct vip *v = bpf_map_lookup_elem(&vips, &vk);
	if (!v || !(v->flags & VIP_LIVE)) /* a standby forwards nothing */
		return NOT_MINE;
	struct flow *f = bpf_map_lookup_elem(&conns, &n->flow);
	if (!f)
		return NOT_MINE;
	if ((__s32)(f->expires - (__u32)(now >> TICK_SHIFT)) <= 0) {
		*why = R_EXPIRED;
		return NOT_MINE;
	}
	__u32 state = f->state & (STATES - 1);
	struct next_state *ns = bpf_map_lookup_elem(&nat_next_state, &one);
	struct timeouts *to = bpf_map_lookup_elem(&timeouts, &zero);
	if (!ns || !to) {
		*why = R_ERROR;
		return NOT_MINE;
	}
	if (ns->next[state * 256 + p->flags] != state) {
		*why = R_STATE;
		return NOT_MINE;
	}
	__u32 ri = f->route;
	struct route *r = bpf_map_lookup_elem(&routes, &ri);
	if (!r || !(r->flags & ROUTE_LIVE) || r->mode != MODE_NAT) {
		*why = R_ROUTE_DOWN;
		return NOT_MINE;
	}
	f->expires = (__u32)((now + to->ns[state]) >> TICK_SHIFT);
	*why = R_ERROR;
	if (trim(skb, p->total))
		return NOT_MINE;
	if (rewrite(skb, p->family, p->key.proto, 0, p->key.src, n->vip, p->key.sport, n->flow.dport, n->eth))
		return TC_ACT_SHOT;
	*why = R_NAT_REPLY;
	count_route(&route_out_counters, ri, p->total);
	return bpf_redirect(n->ifindex, 0);
}

/*
 * New flows of the hash schedulers (mh, sh, dh), scheduled here as
 * director/dataplane/scheduler.py does and installed into `conns`, so a new
 * connection's first packet no longer goes through Python. Python writes,
 * per VIP (address, port, protocol) whose service the kernel may schedule
 * (kernelmaps.kernel_schedules: no spill configured, DR or TUN),
 * the scheduler's lookup table: Maglev's table_size slots or IPVS's 256
 * buckets, each the route of the server owning it. The program only takes
 * the plain case: the slot's server takes new flows (ROUTE_NEW: available,
 * weight > 0). A slot of an unusable server (Python's fallback walk), an
 * empty table (the sorry server), a TCP packet that does not open a
 * connection (mh's mid-stream pickup): all left to Python, which decides
 * exactly as before. The flow is marked FLOW_KERNEL until Python has
 * adopted it (the handshake's ACK, a state change, or the sweep reading
 * `conns`), so /status, connection sync and adoption still see it.
 */
#define ROUTE_NEW 2      /* the server takes new flows (available, weight > 0) */
#define SCHED_MH 1
#define SCHED_SH 2
#define SCHED_DH 3
#define SLOT_CHUNK 256   /* slots per `slots` entry */
#define NO_ROUTE 0xffff  /* a slot no server owns */
#define MH_SEED 16       /* scheduler.MH_SEED: jhash's initval for the client's slot */
#define GOLDEN 2654435761u /* IPVS's multiplicative hash (sh, dh) */
#define S_NONE 0
#define S_SYN_RECV 3
#define S_UDP 11

struct svc_key {
	__u16 vip;   /* the VIP's id */
	__u16 port;  /* network order */
	__u8 proto;
	__u8 pad[3];
};

struct svc {
	__u8 kind;   /* SCHED_* */
	__u8 mask4;  /* persistence: the client's prefix length, IPv4 */
	__u8 mask6;  /* and IPv6 */
	__u8 pad;
	__u32 table; /* its number in `slots` and `persist_routes` keys */
	__u32 size;  /* slots: mh's table size, 256 for sh and dh */
	__u32 persist; /* the service's id in `templates` keys; 0: no persistence */
	__u32 timeout; /* persistence timeout, ticks */
};

struct slot_key {
	__u32 table;
	__u32 chunk; /* slot / SLOT_CHUNK */
};

struct slot_chunk {
	__u16 route[SLOT_CHUNK];
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, struct svc_key);
	__type(value, struct svc);
} services SEC(".maps");

/* Only the chunks of the tables in use take memory: ~257 of them for a 65537-slot Maglev table. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct slot_key);
	__type(value, struct slot_chunk);
} slots SEC(".maps");

/*
 * Persistence (IPVS -p timeout -M netmask), per service across its VIPs and
 * ports as scheduler.py's Persistence: a client network sticks to the server
 * its template names. Python's templates are the truth, these their copy:
 * Python writes the ones it makes or refreshes (a flow it scheduled, a
 * synced one), the program the ones it makes here, which Python learns from
 * each flow's event. A template counts the connections it controls only in
 * Python (it lives while it controls one), so an expired one is left to
 * Python (R_TEMPLATE), which honours it or replaces it and writes it back.
 * Not preallocated: only services with persistence fill it; Python deletes
 * the expired ones (KernelSync.sweep), and when full the flow is Python's.
 */
struct tpl_key {
	__u32 persist; /* svc.persist */
	__u8 family;
	__u8 pad[3];
	__u8 addr[16]; /* the client's address masked to the service's prefix length */
};

struct tpl {
	__u32 server;  /* route.server of the server it sticks to */
	__u32 expires; /* ticks, as struct flow's */
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536); /* the loader sizes it to the connection table */
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct tpl_key);
	__type(value, struct tpl);
} templates SEC(".maps");

/* (a VIP's table, a server's id) -> the route of that server x that VIP: where a template's flow goes. */
struct proute_key {
	__u32 table;
	__u32 server;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_ROUTES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct proute_key);
	__type(value, __u32);
} persist_routes SEC(".maps");

/* New flows the program scheduled along each route (Python adds them to Route.conns). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, MAX_ROUTES);
	__type(key, __u32);
	__type(value, __u64);
} route_new SEC(".maps");

/*
 * Flows the program made (new_flow()) or moved to another state (ROUTE_TRACK),
 * told to Python at once through a ring buffer (director/dataplane/kevents.py)
 * instead of when its sweep of `conns` reaches them (up to ~100 s at 1M
 * entries): so /status, the servers' counts and above all connection sync to
 * a backup see them as they happen. A record is the flow's key and value as
 * `conns` holds them after the packet. A full ring never holds a packet up:
 * the event is counted in `flow_events_lost` and the flow left to the sweep.
 */
struct flow_event {
	struct flow_key key;
	struct flow flow;
};

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 20); /* bytes: ~26,000 records of 40 (with the ring's 8-byte header) */
} flow_events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} flow_events_lost SEC(".maps");

static __always_inline void tell(struct flow_key *k, struct flow *f)
{
	struct flow_event *e = bpf_ringbuf_reserve(&flow_events, sizeof(*e), 0);

	if (!e) {
		__u32 zero = 0;
		__u64 *n = bpf_map_lookup_elem(&flow_events_lost, &zero);

		if (n)
			*n += 1;
		return;
	}
	__builtin_memcpy(&e->key, k, sizeof(*k));
	__builtin_memcpy(&e->flow, f, sizeof(*f));
	bpf_ringbuf_submit(e, 0);
}

static __always_inline __u32 rol32(__u32 w, int s)
{
	return (w << s) | (w >> (32 - s));
}

#define JHASH_MIX(a, b, c)                                      \
	do {                                                    \
		a -= c; a ^= rol32(c, 4); c += b;               \
		b -= a; b ^= rol32(a, 6); a += c;               \
		c -= b; c ^= rol32(b, 8); b += a;               \
		a -= c; a ^= rol32(c, 16); c += b;              \
		b -= a; b ^= rol32(a, 19); a += c;              \
		c -= b; c ^= rol32(b, 4); b += a;               \
	} while (0)

#define JHASH_FINAL(a, b, c)                                    \
	do {                                                    \
		c ^= b; c -= rol32(b, 14);                      \
		a ^= c; a -= rol32(c, 11);                      \
		b ^= a; b -= rol32(a, 25);                      \
		c ^= b; c -= rol32(b, 16);                      \
		a ^= c; a -= rol32(c, 4);                       \
		b ^= a; b -= rol32(a, 14);                      \
		c ^= b; c -= rol32(b, 24);                      \
	} while (0)

/* Linux's jhash2 of 1 (IPv4) or 4 (IPv6) words: glb.hashing.jhash_words, bit for bit. */
static __always_inline __u32 jhash_addr(const __u32 *k, int n, __u32 initval)
{
	__u32 a, b, c;

	a = b = c = 0xdeadbeef + ((__u32)n << 2) + initval;
	if (n == 4) {
		a += k[0];
		b += k[1];
		c += k[2];
		JHASH_MIX(a, b, c);
		a += k[3];
	} else {
		a += k[0];
	}
	JHASH_FINAL(a, b, c);
	return c;
}

/* IPVS's addr_fold: an IPv4 address, or the XOR of an IPv6 address's words. */
static __always_inline __u32 fold(const __u32 *w, int n)
{
	return n == 4 ? w[0] ^ w[1] ^ w[2] ^ w[3] : w[0];
}

/* The slot scheduler.py's lookup reads first: MaglevHash.schedule, _BucketHash._lookup. */
static __always_inline __u32 first_slot(struct pkt *p, struct svc *s)
{
	__u32 w[4];
	int n = p->family == 4 ? 1 : 4;
	__u8 *addr = s->kind == SCHED_DH ? p->vip.addr : p->key.src;

#pragma unroll
	for (int i = 0; i < 4; i++)
		w[i] = bpf_ntohl(((__u32 *)addr)[i]);
	if (s->kind == SCHED_MH)
		return s->size ? jhash_addr(w, n, MH_SEED) % s->size : 0;
	return (fold(w, n) * GOLDEN) & 0xff;
}

/* The client's network: its address masked to the service's prefix length, as Persistence.key. */
static __always_inline void client_net(struct tpl_key *tk, struct pkt *p, struct svc *s)
{
	int bits = p->family == 4 ? s->mask4 : s->mask6;

#pragma unroll
	for (int i = 0; i < 4; i++) {
		int left = bits - 32 * i;
		__u32 m = left <= 0 ? 0 : left >= 32 ? 0xffffffffu : ~(0xffffffffu >> left);

		((__u32 *)tk->addr)[i] = ((__u32 *)p->key.src)[i] & bpf_htonl(m);
	}
}

/* A usable route: its server takes new flows and the kernel can send this packet there. */
static __always_inline __u32 usable(struct route *r, struct pkt *p, struct __sk_buff *skb)
{
	if (!r || !(r->flags & ROUTE_LIVE) || !(r->flags & ROUTE_NEW) || r->mode == MODE_NONE)
		return R_NO_FLOW;
	if (r->mode == MODE_TUN && p->family != r->family)
		return R_FAMILY;
	if (r->mode == MODE_TUN && !skb->gso_size && p->total > r->max_inner)
		return R_TOO_BIG;
	return 0;
}

/*
 * A new flow of a service whose scheduler the kernel computes: R_DR or
 * R_TUN with the route set and the flow installed, else why Python decides.
 * With persistence, Persistence.schedule's: the client network's live
 * template if its server is still a usable member (its expiry refreshed),
 * else the scheduler's choice, which becomes the template.
 */
static __always_inline __u32 new_flow(struct __sk_buff *skb, struct pkt *p, __u64 now,
				      struct route **rp, __u32 *ri)
{
	struct svc_key sk = {.vip = p->key.vip, .port = p->key.dport, .proto = p->key.proto};
	struct svc *s = bpf_map_lookup_elem(&services, &sk);
	__u32 zero = 0;

	if (!s)
		return R_NO_FLOW;
	__u8 state = S_UDP;
	if (p->key.proto == IPPROTO_TCP) {
		struct next_state *ns = bpf_map_lookup_elem(&next_state, &zero);

		if (!ns)
			return R_ERROR;
		/* ConnTable.add's first state; only a SYN opens a connection here */
		state = ns->next[S_NONE * 256 + p->flags];
		if (state != S_SYN_RECV)
			return R_NO_FLOW;
	}
	struct route *r = 0;
	__u32 idx = NO_ROUTE, why;
	__u32 tick = (__u32)(now >> TICK_SHIFT);
	struct tpl_key tk = {.persist = s->persist, .family = p->family};
	struct tpl *t = 0;

	if (s->persist) {
		client_net(&tk, p, s);
		t = bpf_map_lookup_elem(&templates, &tk);
		if (t && (__s32)(t->expires - tick) <= 0)
			return R_TEMPLATE; /* Python's copy may still control connections: it decides */
		if (t) {
			struct proute_key pk = {.table = s->table, .server = t->server};
			__u32 *i = bpf_map_lookup_elem(&persist_routes, &pk);

			if (i) { /* a member here; not honoured unless usable (Persistence.get) */
				idx = *i;
				r = bpf_map_lookup_elem(&routes, &idx);
				if (usable(r, p, skb))
					r = 0;
			}
		}
	}
	if (!r) {
		__u32 slot = first_slot(p, s);
		struct slot_key ck = {.table = s->table, .chunk = slot / SLOT_CHUNK};
		struct slot_chunk *c = bpf_map_lookup_elem(&slots, &ck);
		if (!c)
			return R_NO_FLOW;
		idx = c->route[slot & (SLOT_CHUNK - 1)];
		if (idx == NO_ROUTE)
			return R_NO_FLOW;
		r = bpf_map_lookup_elem(&routes, &idx);
		why = usable(r, p, skb);
		if (why)
			return why;
		if (!r)
			return R_NO_FLOW;
		t = 0; /* a new template, or another server for the client network's */
	}
	struct timeouts *to = bpf_map_lookup_elem(&timeouts, &zero);
	if (!to)
		return R_ERROR;
	if (s->persist) {
		__u32 expires = tick + s->timeout;

		if (t) {
			t->expires = expires; /* IPVS refreshes a template on every connection it controls */
		} else {
			struct tpl nt = {.server = r->server, .expires = expires};

			if (bpf_map_update_elem(&templates, &tk, &nt, BPF_ANY))
				return R_TEMPLATE; /* full: Python's templates decide */
		}
	}
	struct flow f = {
		.route = idx,
		.state = state,
		.flags = FLOW_KERNEL,
		.expires = (__u32)((now + to->ns[state]) >> TICK_SHIFT),
	};
	/* NOEXIST: another CPU's packet of the same flow may have made it a moment ago (same slot, same route; that one tells) */
	if (!bpf_map_update_elem(&conns, &p->key, &f, BPF_NOEXIST))
		tell(&p->key, &f);
	__u64 *n = bpf_map_lookup_elem(&route_new, &idx);
	if (n)
		*n += 1;
	count(R_NEW, 0);
	*ri = idx;
	*rp = r;
	return r->mode == MODE_DR ? R_DR : R_TUN;
}

/*
 * Frames the userspace engine must see (what its classic filter,
 * director/dataplane/bpf.py, takes): not another host's or an outgoing one;
 * IP to a VIP (the `vips` map), ARP about a VIP: the engine's alone;
 * ICMPv6 to a solicited-node group (neighbour solicitations; the engine
 * checks the target): the host may need them too.
 */
#define NOT_ENGINE 0
#define ENGINE_ONLY 1
#define ENGINE_TOO 2

static __always_inline int is_vip(__u8 family, void *addr)
{
	struct vip_key k = {.family = family};

	__builtin_memcpy(k.addr, addr, family == 4 ? 4 : 16);
	struct vip *v = bpf_map_lookup_elem(&vips, &k);

	return v && (v->flags & VIP_LIVE);
}

/*
 * A NAT real server's frame: its replies the program did not forward, and
 * its answers to the director's own probes, which the host needs as well
 * (the NAT guard, ownership.NatGuard, drops the others in the host).
 */
static __always_inline int nat_source(__u8 family, void *addr)
{
	struct vip_key k = {.family = family};

	__builtin_memcpy(k.addr, addr, family == 4 ? 4 : 16);
	return bpf_map_lookup_elem(&nat_sources, &k) != 0;
}

/* Read directly, as decide() does (which has made an IP frame's headers linear already). */
static __always_inline int for_engine(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;

	if (skb->pkt_type == PACKET_OTHERHOST || skb->pkt_type == PACKET_OUTGOING)
		return NOT_ENGINE;
	if ((void *)(eth + 1) > data_end)
		return NOT_ENGINE;
	__u16 proto_eth = eth->h_proto;

	if (proto_eth != bpf_htons(ETH_P_ARP) && proto_eth != bpf_htons(ETH_P_IP) && proto_eth != bpf_htons(ETH_P_IPV6))
		return NOT_ENGINE;
	/* IPv4's header ends at 20, ARP's target address at 28 */
	if (linear(skb, ETH_HLEN + (proto_eth == bpf_htons(ETH_P_IPV6) ? sizeof(struct ipv6hdr) : 28))) {
		data = (void *)(long)skb->data;
		data_end = (void *)(long)skb->data_end;
	}
	eth = data;
	if (proto_eth == bpf_htons(ETH_P_ARP)) {
		__u8 *tpa = data + ETH_HLEN + 24; /* the target's protocol address */

		if ((void *)(tpa + 4) > data_end)
			return NOT_ENGINE;
		return is_vip(4, tpa) ? ENGINE_ONLY : NOT_ENGINE;
	}
	if (proto_eth == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = (void *)(eth + 1);

		if ((void *)(ip + 1) > data_end)
			return NOT_ENGINE;
		if (is_vip(4, &ip->daddr))
			return ENGINE_ONLY;
		return nat_source(4, &ip->saddr) ? ENGINE_TOO : NOT_ENGINE;
	}
	struct ipv6hdr *ip6 = (void *)(eth + 1);

	if ((void *)(ip6 + 1) > data_end)
		return NOT_ENGINE;
	__u8 *a = ip6->daddr.s6_addr;

	if (ip6->nexthdr == IPPROTO_ICMPV6 && a[0] == 0xff && a[1] == 0x02 && a[11] == 1 && a[12] == 0xff)
		return ENGINE_TOO; /* ff02::1:ffXX:XXXX */
	if (is_vip(6, a))
		return ENGINE_ONLY;
	return nat_source(6, &ip6->saddr) ? ENGINE_TOO : NOT_ENGINE;
}

/*
 * A frame the program does not forward: the engine's frames go to the
 * slow-path veth it reads (AF_PACKET taps on this interface would see every
 * frame, forwarded or not, before tc: so the engine does not listen here);
 * the rest to the host. No slow path set (tests): everything to the host.
 */
static __always_inline int leave(struct __sk_buff *skb)
{
	__u32 zero = 0, in = skb->ifindex;
	__u32 *slow = bpf_map_lookup_elem(&slowpaths, &in); /* the LAN side's own */

	if (!slow)
		slow = bpf_map_lookup_elem(&slowpath, &zero);
	if (!slow || !*slow)
		return TC_ACT_OK;
	switch (for_engine(skb)) {
	case ENGINE_ONLY:
		return bpf_redirect(*slow, 0);
	case ENGINE_TOO:
		bpf_clone_redirect(skb, *slow, 0);
		return TC_ACT_OK;
	}
	return TC_ACT_OK;
}

SEC("tc")
int glb_ingress(struct __sk_buff *skb)
{
	struct pkt p = {};
	struct flow *f = 0;
	struct route *r = 0;
	__u32 ri = 0, zero = 0;
	/* The coarse clock (CLOCK_MONOTONIC at the last tick, up to 1/HZ behind; LVS's timers are jiffies
	 * too) costs no TSC read: ~1 % of the 64-byte packet rate on the director benchmark. */
	__u64 now = bpf_ktime_get_coarse_ns();

	/* The engine's filter refuses these too: forwarding one would duplicate another host's frame. */
	if (skb->pkt_type == PACKET_OTHERHOST)
		return count(R_OTHER_HOST, TC_ACT_OK);
	__u32 why = decide(skb, &p, now, &f, &r, &ri);

	if (why == R_NO_FLOW && p.live)
		why = new_flow(skb, &p, now, &r, &ri);
	if (why == R_NO_FLOW && p.key.proto && !p.live) { /* parsed, not to a VIP: maybe a NAT reply */
		int verdict = reply_nat(skb, &p, now, &why);

		if (verdict != NOT_MINE)
			return count(why, verdict);
	}
	if (why != R_DR && why != R_TUN && why != R_NAT)
		return count(why, leave(skb));
	if (!r)
		return count(R_ERROR, leave(skb));
	struct timeouts *to = bpf_map_lookup_elem(&timeouts, &zero);
	if (!to)
		return count(R_ERROR, leave(skb));
	/* Decided: refresh the expiry as ConnTable.refresh does (a new flow got its own). */
	if (f) {
		__u8 moved = p.next != f->state;

		if (moved) {
			/* ConnTable._transition's, in the kernel: Python hears it from `flow_events` (or its sweep) */
			f->state = p.next;
			f->flags |= FLOW_KERNEL;
			count(R_TRACKED, 0);
		}
		f->expires = (__u32)((now + to->ns[f->state & (STATES - 1)]) >> TICK_SHIFT);
		if (moved)
			tell(&p.key, f);
	}
	int verdict = why == R_DR ? forward_dr(skb, r)
		    : why == R_NAT ? forward_nat(skb, r, &p)
				  : forward_tun(skb, r, p.total, p.family, p.tos, p.ttl, p.frag_off);
	if (verdict == TC_ACT_OK)
		return leave(skb); /* a helper failed before changing the packet */
	if (verdict == TC_ACT_REDIRECT)
		count_route(&route_counters, ri, p.total);
	return verdict;
}

char LICENSE[] SEC("license") = "GPL";
