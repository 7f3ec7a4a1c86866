/**
 * The agent's side of the `outgoing` feature: the app's connections and look-ups made from
 * inside the target's network namespace, so they come from the pod's address and obey its
 * routes, policies and sidecars. The agent's main thread enters that namespace at the first
 * request (netns.cc): its session's listener, made before, stays where the CLI reaches it, and
 * every socket Node makes after is the target's. Names are resolved by a program that enters
 * the target's namespaces (resolver.c), so its resolv.conf and hosts are the ones read.
 */
import dgram from 'node:dgram';
import { existsSync } from 'node:fs';
import { createRequire } from 'node:module';
import net from 'node:net';
import { join } from 'node:path';
import type { TapNetns } from '../../agent/tap.js';
import { packageRoot } from '../../package-root.js';
import type { Streams } from '../../protocol/streams.js';
import type { WireValue } from '../../protocol/messages.js';
import {
  connectionReplyBody,
  resolutionReplyBody,
  type Connection,
  type OutgoingRequest,
} from './messages.js';
import { TargetResolver } from './resolver.js';

interface NativeNetns {
  enterNetns(path: string): void;
}

function loadNative(): NativeNetns {
  const path = join(packageRoot(), 'build', 'Release', 'mirrord_netns.node');
  if (!existsSync(path)) {
    throw new Error(`the netns addon is not built (${path}); run npm run build`);
  }
  return createRequire(import.meta.url)(path) as NativeNetns;
}

type Destination = Exclude<OutgoingRequest, { op: 'resolve' }>;

export class TargetOutgoing {
  readonly #target: TapNetns;
  readonly #streams: () => Streams;
  readonly #resolver: TargetResolver;
  #entered = false;

  /**
   * `target`: the target's network namespace, a process's or a named one (ip netns);
   * `streams`: the current session's, which the connections join.
   */
  constructor(target: TapNetns, streams: () => Streams) {
    this.#target = target;
    this.#streams = streams;
    this.#resolver = new TargetResolver(target);
  }

  /** The request's reply body. */
  async serve(request: OutgoingRequest): Promise<WireValue> {
    if (request.op === 'resolve') {
      return resolutionReplyBody(await this.#resolver.resolve(request.name, request.family));
    }
    this.#enter();
    return connectionReplyBody(
      await (request.op === 'connect' ? this.#connect(request) : this.#udp(request)),
    );
  }

  close(): void {
    this.#resolver.close();
  }

  #enter(): void {
    if (this.#entered) return;
    const target = this.#target;
    loadNative().enterNetns(
      'pid' in target ? `/proc/${target.pid}/ns/net` : `/run/netns/${target.netns}`,
    );
    this.#entered = true;
  }

  /** Resolves once the target's connect succeeded or failed, as its own would have. */
  #connect(request: Destination): Promise<Connection> {
    return new Promise((resolve) => {
      const socket = net.connect({
        host: request.address,
        port: request.port,
        family: request.family,
        allowHalfOpen: true,
      });
      const failed = (error: NodeJS.ErrnoException): void =>
        resolve({ errno: error.code ?? 'EIO', localAddress: null, localPort: 0 });
      socket.once('error', failed);
      socket.once('connect', () => {
        socket.off('error', failed);
        this.#streams().joinSocket(request.stream, socket);
        resolve({
          errno: null,
          localAddress: socket.localAddress ?? '',
          localPort: socket.localPort ?? 0,
        });
      });
    });
  }

  /** A UDP socket in the target connected to the destination: the stream's datagrams. */
  #udp(request: Destination): Promise<Connection> {
    return new Promise((resolve) => {
      const socket = dgram.createSocket(request.family === 6 ? 'udp6' : 'udp4');
      let open = true;
      const close = (): void => {
        if (open) socket.close();
        open = false;
      };
      const failed = (error: NodeJS.ErrnoException): void => {
        close();
        resolve({ errno: error.code ?? 'EIO', localAddress: null, localPort: 0 });
      };
      socket.once('error', failed);
      socket.connect(request.port, request.address, () => {
        socket.off('error', failed);
        const streams = this.#streams();
        // A refused datagram (ICMP port unreachable) shows as an error on a connected socket;
        // the app's own socket would not see it on its next send either way: it is dropped.
        socket.on('error', () => undefined);
        socket.on('message', (bytes) => streams.sendDatagram(request.stream, bytes));
        streams.joinDatagrams(
          request.stream,
          (bytes) => {
            if (open) socket.send(bytes);
          },
          close,
        );
        const { address, port } = socket.address();
        resolve({ errno: null, localAddress: address, localPort: port });
      });
    });
  }
}
