// The source address of the session's replayed connections to an IPv4 loopback listener: the
// layer makes only connections from it wait for their original client (sa_is_replay_source).
//
// The session's side is REPLAY_SOURCE in src/session/replay.ts; test/record-layout.test.ts
// compiles this header and fails when the two differ. Checked rather than generated: the layer
// is built by make alone and cannot read TypeScript, TypeScript cannot import a C header, and
// passing the address at run time would add a step to every process's start for a constant.
#ifndef MIRRORD_REPLAY_SOURCE_H
#define MIRRORD_REPLAY_SOURCE_H

#include <stdint.h>

static const uint8_t replay_source_ipv4[4] = {127, 0, 0, 2};

#endif
