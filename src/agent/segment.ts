/** The two ends of one direction of a TCP connection, as the tap saw it. */
export interface FlowEndpoints {
  family: 4 | 6;
  clientAddress: string;
  clientPort: number;
  serverAddress: string;
  serverPort: number;
  /** Index of the interface (inside the target's netns) the segment arrived on. */
  ifindex: number;
}

/** TCP flag bits, as in the TCP header's flags byte. */
export const TcpFlag = {
  FIN: 0x01,
  SYN: 0x02,
  RST: 0x04,
  PSH: 0x08,
  ACK: 0x10,
} as const;

/**
 * One client→server TCP segment copied by the tap. `flowKey` is the same string for every
 * segment of one direction of one connection (4-tuple), so the reassembler can look flows up
 * without decoding addresses; `endpoints()` decodes them and is called once per connection.
 */
export interface TapSegment {
  flowKey: string;
  /** Sequence number of payload[0] (or of the SYN/FIN), uint32. */
  seq: number;
  flags: number;
  /** Valid until the end of the tap batch it came in (see TapHandlers): copy it to keep it. */
  payload: Buffer;
  /**
   * When the tap saw it (CLOCK_MONOTONIC, µs; see src/protocol/clock.ts). A record joined from
   * several segments carries the first one's.
   */
  tapMicros: number;
  endpoints(): FlowEndpoints;
}
