/**
 * The outgoing feature between the app's layer and the agent. The layer (layer/outgoing.c)
 * asks for each connection and look-up that goes through the target; the agent makes it, and
 * the app's own socket then really connects to a relay here, on loopback, which joins it to
 * the agent's socket as a session stream. So the app holds a real connected TCP socket:
 * blocking or not, poll, epoll, half-close and backpressure are the kernel's own. A TCP relay
 * knows the app's socket by its source port, which the layer bound before asking. A UDP relay
 * is a socket per app socket and destination: what the app sends it goes out of the agent's
 * socket connected to that destination, and the answers come back from it.
 */
import dgram from 'node:dgram';
import net from 'node:net';
import type { LayerChannel, LayerReply } from '../../session/layer-channel.js';
import type { LayerMessage, SessionMessage } from '../../session/layer-messages.js';
import type { RemoteOutgoing } from './cli.js';
import type { Family } from './messages.js';

/** How long the app's socket has to reach its relay after the layer was answered. */
const RELAY_WAIT_MS = 10_000;
/**
 * A UDP relay nobody sent through for this long is closed: the layer does not say when the
 * app closes a UDP socket, and a DNS client makes one per query.
 */
const UDP_IDLE_MS = 60_000;

const LOOPBACK: Record<Family, string> = { 4: '127.0.0.1', 6: '::1' };

type ConnectRequest = Extract<LayerMessage, { type: 'connect' }>;
type Connected = Omit<Extract<SessionMessage, { type: 'connected' }>, 'type' | 'id'>;

/** The layer's answer for a connect that fails with `errno`. */
const failed = (errno: string): Connected => ({
  errno,
  relayPort: 0,
  localAddress: null,
  localPort: 0,
});

/** A connection the agent opened, whose app end has not reached its relay yet. */
interface Expected {
  outgoing: RemoteOutgoing;
  stream: number;
  timer: NodeJS.Timeout;
}

/**
 * Serves the app's outgoing connections and look-ups through `outgoing()`, the current
 * session's, until the channel closes; resolves once the relays listen.
 */
export async function serveAppOutgoing(
  channel: LayerChannel,
  outgoing: () => RemoteOutgoing,
  log: (line: string) => void,
): Promise<{ close(): void }> {
  const relays = new Map<Family, net.Server>();
  /** By the relay's family and the app socket's port. */
  const expected = new Map<string, Expected>();
  const keyOf = (family: Family, port: number): string => `${family}/${port}`;
  /** Each open UDP relay's one way to close it (the session's end and the channel's both do). */
  const udpRelays = new Set<() => void>();

  for (const family of [4, 6] as const) {
    const relay = net.createServer({ allowHalfOpen: true, noDelay: true });
    relay.on('connection', (socket) => {
      const key = keyOf(family, socket.remotePort ?? 0);
      const waiting = expected.get(key);
      if (!waiting) {
        socket.destroy();
        return;
      }
      expected.delete(key);
      clearTimeout(waiting.timer);
      waiting.outgoing.join(waiting.stream, socket);
    });
    const listening = await new Promise<boolean>((resolve) => {
      relay.once('error', () => resolve(false));
      relay.listen(0, LOOPBACK[family], () => resolve(true));
    });
    // A machine without IPv6 on loopback has no ::1: its apps reach IPv6 destinations only
    // through v4-mapped addresses, which the IPv4 relay takes.
    if (listening) relays.set(family, relay);
  }

  const openTcp = async (request: ConnectRequest, session: RemoteOutgoing): Promise<Connected> => {
    // Without ::1 (see above), the layer reaches the IPv4 relay through ::ffff:127.0.0.1.
    const relayFamily = relays.has(request.family) ? request.family : 4;
    const relay = relays.get(relayFamily);
    if (!relay) {
      return failed('EAFNOSUPPORT');
    }
    const opened = await session.open('tcp', request.family, request.address, request.port);
    if (opened.errno !== null) {
      return failed(opened.errno);
    }
    const key = keyOf(relayFamily, request.localPort);
    // An earlier connection from the same port that never came: its socket was closed.
    const stale = expected.get(key);
    if (stale) {
      clearTimeout(stale.timer);
      stale.outgoing.abandon(stale.stream);
    }
    expected.set(key, {
      outgoing: session,
      stream: opened.stream,
      timer: setTimeout(() => {
        expected.delete(key);
        session.abandon(opened.stream);
      }, RELAY_WAIT_MS),
    });
    return {
      errno: null,
      relayPort: (relay.address() as net.AddressInfo).port,
      localAddress: opened.localAddress,
      localPort: opened.localPort,
    };
  };

  const openUdp = async (request: ConnectRequest, session: RemoteOutgoing): Promise<Connected> => {
    // As for TCP: on ::1 when this machine has it, else on 127.0.0.1.
    const relayFamily = relays.has(request.family) ? request.family : 4;
    const relay = dgram.createSocket(relayFamily === 6 ? 'udp6' : 'udp4');
    await new Promise<void>((resolve, reject) => {
      relay.once('error', reject);
      relay.bind(0, LOOPBACK[relayFamily], () => {
        relay.off('error', reject);
        resolve();
      });
    });
    const opened = await session
      .open('udp', request.family, request.address, request.port)
      .catch((error: Error) => {
        relay.close();
        throw error;
      });
    if (opened.errno !== null) {
      relay.close();
      return failed(opened.errno);
    }
    const idle = setTimeout(() => session.abandon(opened.stream), UDP_IDLE_MS);
    const closeRelay = (): void => {
      if (!udpRelays.delete(closeRelay)) return;
      clearTimeout(idle);
      relay.close();
    };
    udpRelays.add(closeRelay);
    const active = (): void => void idle.refresh();
    // The app's socket, as the relay sees it: on loopback, from its own port.
    const app = { port: request.localPort, address: LOOPBACK[relayFamily] };
    relay.on('error', () => undefined);
    relay.on('message', (bytes, from) => {
      if (from.port !== app.port) return;
      active();
      session.sendDatagram(opened.stream, bytes);
    });
    session.joinDatagrams(
      opened.stream,
      (bytes) => {
        active();
        relay.send(bytes, app.port, app.address);
      },
      closeRelay,
    );
    return {
      errno: null,
      relayPort: relay.address().port,
      localAddress: opened.localAddress,
      localPort: opened.localPort,
    };
  };

  const answer = async (request: ConnectRequest, reply: LayerReply): Promise<void> => {
    let connected: Connected;
    try {
      const session = outgoing();
      connected =
        request.protocol === 'tcp'
          ? await openTcp(request, session)
          : await openUdp(request, session);
    } catch (error) {
      // The session is gone, or the agent failed the request: the app's connect fails as
      // unreachable, never hangs.
      log(
        `mirrord: ${request.protocol} to ${request.address}:${request.port} for the app failed: ${(error as Error).message}`,
      );
      connected = failed('ENETUNREACH');
    }
    await reply.send({ type: 'connected', id: request.id, ...connected });
  };

  channel.on('connect', (request, reply) => void answer(request, reply));
  channel.on('resolve', (request, reply) => {
    void outgoing()
      .resolve(request.name, request.family)
      .catch((error: Error) => {
        log(`mirrord: looking up ${request.name} for the app failed: ${error.message}`);
        return { error: 'AGAIN', canonicalName: null, addresses: [] };
      })
      .then((resolution) => reply.send({ type: 'resolved', id: request.id, ...resolution }));
  });

  return {
    close: () => {
      for (const relay of relays.values()) relay.close();
      for (const closeRelay of udpRelays) closeRelay();
      for (const waiting of expected.values()) clearTimeout(waiting.timer);
    },
  };
}
