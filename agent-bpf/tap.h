/* Record layout shared by tap.bpf.c (producer), tap_addon.cc (ring buffer consumer) and
 * src/agent/tap.ts (parser). Every field is little-endian host order except the addresses, which
 * stay in network order so IPv4 and IPv6 decode the same way. The parser's copy of the layout is
 * TAP_RECORD_FIELDS in src/agent/tap.ts: test/record-layout.test.ts compiles this header and
 * fails when a field, the header's size or TAP_RECORD_ALIGN differ. */
#ifndef MIRRORD_TAP_H
#define MIRRORD_TAP_H

#include <linux/types.h>

/* One record's payload capacity. A GSO/GRO skb carries up to 64 KiB of TCP payload, so one
 * record normally holds a whole skb; bigger (BIG TCP) skbs are split over several records. */
#define TAP_CHUNK 65536u
/* Records per skb: 8 chunks cover the 512 KiB BIG TCP maximum (GSO_MAX_SIZE). */
#define TAP_MAX_CHUNKS 8

struct tap_record {
    __u64 timestamp_ns; /* bpf_ktime_get_ns() (CLOCK_MONOTONIC) when the tap saw the skb */
    __u32 seq;          /* as on the wire: payload[0] is at seq + 1 when SYN is set */
    __u32 ifindex;      /* interface, inside the target's netns, the segment arrived on */
    __u32 payload_len;  /* bytes following this header */
    __u16 sport;
    __u16 dport;
    __u8 family; /* 4 or 6 */
    __u8 flags;  /* TCP flags byte (FIN 0x01, SYN 0x02, RST 0x04, PSH 0x08, ACK 0x10) */
    __u8 pad[6];
    __u8 saddr[16]; /* network order; IPv4 uses the first 4 bytes, the rest is zero */
    __u8 daddr[16];
};
/* payload_len bytes of TCP payload follow each header. */

/* The consumer places records back to back in a batch buffer, each padded to this alignment,
 * so headers stay 8-byte aligned. */
#define TAP_RECORD_ALIGN 8u

/* Summed over CPUs by the loader. A "segment" here is one record: a big skb split into several
 * records counts several times. */
struct tap_counters {
    __u64 segments_copied;
    __u64 bytes_copied;     /* payload bytes */
    __u64 segments_dropped; /* ring buffer full */
    __u64 bytes_dropped;
};

#endif
