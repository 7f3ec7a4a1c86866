/** The files feature's messages on the wire (src/features/files/messages.ts). */
import {
  MAX_READ_BYTES,
  fileReplyBody,
  fileRequestBody,
  parseFileReply,
  parseFileRequest,
  type FileReply,
  type FileRequest,
} from '../src/features/files/messages.js';
import { FrameDecoder, encodeFrame } from '../src/protocol/framing.js';
import {
  ProtocolError,
  agentMessageToWire,
  clientMessageToWire,
  parseAgentMessage,
  parseClientMessage,
  type ReplyMessage,
  type RequestMessage,
} from '../src/protocol/messages.js';

const clientDecoder = () => new FrameDecoder(parseClientMessage);
const agentDecoder = () => new FrameDecoder(parseAgentMessage);

describe('files messages', () => {
  const stat = {
    kind: 'file' as const,
    mode: 0o100644,
    size: 2 ** 40,
    uid: 1000,
    gid: 1000,
    ino: 2 ** 50,
    nlink: 1,
    dev: 2049,
    atimeNs: 1_764_000_000_123_456_789n,
    mtimeNs: 0n,
    ctimeNs: 9_999_999_999_999_999_999n,
  };

  test('every request and reply survives the wire, nanoseconds and all', () => {
    const requests: FileRequest[] = [
      { op: 'stat', path: '/etc/é', follow: false },
      { op: 'open', path: 'relative/../x' },
      { op: 'read', handle: 7, offset: 2 ** 40, length: MAX_READ_BYTES },
      { op: 'close', handle: 7 },
      { op: 'list', path: '/' },
      { op: 'readlink', path: '/l' },
    ];
    for (const request of requests) {
      const frame = encodeFrame([
        clientMessageToWire({
          type: 'request',
          id: 1,
          feature: 'files',
          body: fileRequestBody(request),
        }),
      ]);
      const [message] = clientDecoder().push(frame) as RequestMessage[];
      expect(parseFileRequest(message!.body)).toEqual(request);
    }
    const replies = [
      ['stat', { errno: null, result: stat }],
      ['open', { errno: null, result: { handle: 3, stat, head: Buffer.from('first') } }],
      ['open', { errno: null, result: { handle: 0, stat, head: Buffer.alloc(0) } }],
      ['read', { errno: null, result: Buffer.from('bytes') }],
      ['close', { errno: null, result: null }],
      [
        'list',
        {
          errno: null,
          result: [
            ['a', 'dir'],
            ['b', 'symlink'],
          ],
        },
      ],
      ['readlink', { errno: null, result: '/target' }],
      ['open', { errno: 'ENOENT', result: null }],
    ] as const;
    for (const [op, reply] of replies) {
      const body = fileReplyBody(op, reply as FileReply<typeof op>);
      const frame = encodeFrame([agentMessageToWire({ type: 'reply', id: 1, error: null, body })]);
      const [message] = agentDecoder().push(frame) as ReplyMessage[];
      expect(parseFileReply(op, message!.body)).toEqual(reply);
    }
  });

  test('malformed bodies are protocol errors that name what is wrong', () => {
    expect(() => parseFileRequest(['read', 1, 0, MAX_READ_BYTES + 1])).toThrow(/at most/);
    expect(() => parseFileRequest(['chmod', '/x'])).toThrow(/no operation chmod/);
    expect(() => parseFileRequest(['stat', '/x'])).toThrow(/follow/);
    expect(() => parseFileRequest(null)).toThrow(ProtocolError);
    expect(() => parseFileReply('stat', [null, ['file', 1]])).toThrow(/expected a stat/);
    expect(() => parseFileReply('list', [null, [['a', 'pipe']]])).toThrow(/name, kind/);
    expect(() => parseFileReply('read', [null, 'text'])).toThrow(/expected bytes/);
  });
});
