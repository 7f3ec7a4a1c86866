/**
 * The CLI's side of the layer socket, with the real layer preloaded into a real Node server on
 * loopback.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { existsSync } from 'node:fs';
import net from 'node:net';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { LayerChannel, type AppListener } from '../src/session/layer-channel.js';
import { REPLAY_SOURCE } from '../src/session/replay.js';

const LAYER = join(
  dirname(fileURLToPath(import.meta.url)),
  '..',
  'layer',
  '.output',
  'mirrord_layer.so',
);
const PORT = 36000 + Math.floor(Math.random() * 900);

/** Answers every request with the peer address the app itself sees. */
const APP = `
require('http')
  .createServer((req, res) => res.end(req.socket.remoteAddress + ':' + req.socket.remotePort))
  .listen(${PORT}, '127.0.0.1');`;

function request(port: number, onConnect: (socket: net.Socket) => void): Promise<string> {
  return new Promise((resolve, reject) => {
    // From the replay's source address, as the session connects.
    const socket = net.connect({ port, host: '127.0.0.1', localAddress: REPLAY_SOURCE }, () => {
      onConnect(socket);
      socket.end('GET / HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n');
    });
    let answer = '';
    socket.on('data', (chunk: Buffer) => (answer += chunk.toString()));
    socket.on('end', () => resolve(answer.split('\r\n\r\n')[1] ?? ''));
    socket.on('error', reject);
  });
}

describe('layer channel', () => {
  let channel: LayerChannel;
  const children: ChildProcess[] = [];
  const servers: net.Server[] = [];

  beforeEach(async () => {
    channel = await LayerChannel.open();
  });

  afterEach(async () => {
    for (const child of children.splice(0)) child.kill('SIGKILL');
    for (const server of servers.splice(0)) server.close();
    await channel.close();
  });

  function startApp(token = channel.token, user?: number): ChildProcess {
    const env = {
      ...process.env,
      LD_PRELOAD: LAYER,
      MIRRORD_LAYER_SOCKET: channel.path,
      MIRRORD_LAYER_TOKEN: token,
    };
    const child =
      user === undefined
        ? spawn(process.execPath, ['-e', APP], { env, stdio: 'ignore' })
        : spawn(
            'setpriv',
            [`--reuid=${user}`, `--regid=${user}`, '--clear-groups', process.execPath, '-e', APP],
            { env, stdio: 'ignore' },
          );
    children.push(child);
    return child;
  }

  test('learns where the app listens, and the app sees the original client', async () => {
    const listening = once(channel, 'listen') as Promise<[AppListener]>;
    const app = startApp();
    const [listener] = await listening;
    expect(listener).toMatchObject({ pid: app.pid, port: PORT, localPort: PORT, family: 4 });
    expect(channel.listening()).toEqual([listener]);

    const seen = await request(listener.localPort, (socket) =>
      channel.announcePeer(socket.localPort!, {
        address: '10.213.9.9',
        port: 40000,
      }),
    );
    expect(seen).toBe('10.213.9.9:40000');

    const closed = once(channel, 'close');
    app.kill('SIGKILL');
    expect(await closed).toEqual([{ pid: app.pid, port: PORT }]);
    expect(channel.listening()).toEqual([]);
  });

  test('an app whose port is taken listens elsewhere and says which', async () => {
    const squatter = net.createServer();
    servers.push(squatter);
    await new Promise<void>((resolve) => squatter.listen(PORT, '127.0.0.1', resolve));
    const listening = once(channel, 'listen') as Promise<[AppListener]>;
    startApp();
    const [listener] = await listening;
    expect(listener.port).toBe(PORT);
    expect(listener.localPort).not.toBe(PORT);
    const seen = await request(listener.localPort, (socket) =>
      channel.announcePeer(socket.localPort!, {
        address: '10.213.9.10',
        port: 40001,
      }),
    );
    expect(seen).toBe('10.213.9.10:40001');
  });

  test('an app that dropped privileges still reaches the session; a wrong token is not heard', async () => {
    const heard: AppListener[] = [];
    channel.on('listen', (listener) => heard.push(listener));
    const impostor = startApp('0'.repeat(32));
    await once(impostor, 'spawn');
    const listening = once(channel, 'listen') as Promise<[AppListener]>;
    const nobody = startApp(channel.token, 65534);
    const [listener] = await listening;
    expect(listener).toMatchObject({ pid: nobody.pid, port: PORT });
    // The impostor listens too (on another port: ours is taken), but was never heard.
    await new Promise((resolve) => setTimeout(resolve, 300));
    expect(heard.map((l) => l.pid)).toEqual([nobody.pid]);
  });

  test('close removes the socket', async () => {
    const { path } = channel;
    expect(existsSync(path)).toBe(true);
    await channel.close();
    expect(existsSync(path)).toBe(false);
    channel = await LayerChannel.open();
  });
});
