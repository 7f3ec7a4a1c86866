/**
 * A client of the Kubernetes `pods/portforward` subresource over WebSocket (subprotocol
 * `v4.channel.k8s.io`), as one Node Duplex carrying the bytes of one TCP connection to a port of
 * a pod. Written on `ws` directly because client-node's PortForward ignores backpressure and never
 * ends its output stream when the forward closes.
 *
 * The v4 protocol: every message is binary, its first byte names a channel (for the one port
 * forwarded: 0 carries data both ways, 1 carries the server's error text), and the first bytes
 * the server sends on each channel are the port, 2 bytes little-endian.
 */
import type { KubeConfig } from '@kubernetes/client-node';
import type { IncomingMessage } from 'node:http';
import { Duplex } from 'node:stream';
import WebSocket from 'ws';

const SUBPROTOCOL = 'v4.channel.k8s.io';
const DATA_CHANNEL = 0;
const ERROR_CHANNEL = 1;
const PORT_HEADER_BYTES = 2;
/** Bytes the WebSocket may hold unsent before a write waits for the socket to take them. */
const SEND_HIGH_WATER_MARK = 1024 * 1024;
/** Bytes received but not yet read before the WebSocket stops reading its socket. */
const RECEIVE_HIGH_WATER_MARK = 1024 * 1024;
const CONNECT_TIMEOUT_MS = 30_000;
/** How long a close waits for the server's close frame before the socket is cut. */
const CLOSE_TIMEOUT_MS = 2_000;
/** Close codes of a forward that ended as it should (1005: a close frame without a code). */
const CLEAN_CLOSE_CODES = new Set([1000, 1005]);
const UNREACHABLE_CODES = new Set([
  'ECONNREFUSED',
  'ECONNRESET',
  'ENOTFOUND',
  'EAI_AGAIN',
  'EHOSTUNREACH',
  'ENETUNREACH',
  'ETIMEDOUT',
]);

export interface PortForwardErrorOptions extends ErrorOptions {
  /** The HTTP status the API server refused the upgrade with. */
  statusCode?: number;
  /** The body it sent with that status (a `Status` object, from an API server). */
  body?: string;
}

export class PortForwardError extends Error {
  override name = 'PortForwardError';
  /** Set when the API server refused the upgrade with an HTTP status (403: RBAC). */
  readonly statusCode?: number;
  readonly body?: string;

  constructor(message: string, { statusCode, body, ...options }: PortForwardErrorOptions = {}) {
    super(message, options);
    this.statusCode = statusCode;
    this.body = body;
  }
}

/** What a Status object (the API server's error body) says, or the start of whatever it was. */
function describeErrorBody(body: string): string {
  try {
    const status = JSON.parse(body) as { message?: unknown };
    if (typeof status.message === 'string' && status.message) return oneLine(status.message);
  } catch {
    // Not JSON: a proxy's or load balancer's page.
  }
  return oneLine(body).slice(0, 200);
}

function oneLine(text: string): string {
  return text.replace(/\s+/g, ' ').trim();
}

function portForwardUrl(kubeConfig: KubeConfig, namespace: string, pod: string, port: number) {
  const cluster = kubeConfig.getCurrentCluster();
  if (!cluster) throw new Error('the kubeconfig has no current cluster');
  let url: URL;
  try {
    url = new URL(cluster.server);
  } catch {
    throw new Error(`the kubeconfig's server "${cluster.server}" is not a URL`);
  }
  url.protocol = url.protocol === 'http:' ? 'ws:' : 'wss:';
  // The server URL may carry a path prefix (clusters behind Rancher and similar proxies).
  url.pathname = `${url.pathname.replace(/\/$/, '')}/api/v1/namespaces/${encodeURIComponent(
    namespace,
  )}/pods/${encodeURIComponent(pod)}/portforward`;
  url.search = `?ports=${port}`;
  return url;
}

/**
 * Opens a port-forward to `port` of `namespace/pod`, authenticated and verified exactly as the
 * kubeconfig's current context says (CA, client certificate, bearer token, exec and OIDC token
 * providers, insecure-skip-tls-verify). Resolves with the connection as a Duplex once the server
 * has started the forward; rejects with a one-line {@link PortForwardError}.
 *
 * The Duplex: writes complete only once the WebSocket holds less than 1 MiB unsent; a reader
 * that falls behind stops the WebSocket reading its socket, so TCP pushes back to the pod.
 * `end()` closes the WebSocket cleanly, which ends the pod-side connection. The server closing
 * the forward ends the Duplex; text on the error channel, a broken connection or an abnormal
 * close destroy it with a PortForwardError.
 */
export async function openPortForward(
  kubeConfig: KubeConfig,
  namespace: string,
  pod: string,
  port: number,
): Promise<Duplex> {
  const prefix = `port-forward to pod ${namespace}/${pod} port ${port} failed`;
  let url: URL;
  try {
    url = portForwardUrl(kubeConfig, namespace, pod, port);
  } catch (error) {
    throw new PortForwardError(`${prefix}: ${(error as Error).message}`);
  }
  const options: WebSocket.ClientOptions & { closeTimeout: number } = {
    handshakeTimeout: CONNECT_TIMEOUT_MS,
    closeTimeout: CLOSE_TIMEOUT_MS,
    // The payload is whatever the pod sends (here: msgpack with binary payloads); compressing
    // it would cost CPU on both ends for little.
    perMessageDeflate: false,
  };
  try {
    await kubeConfig.applyToHTTPSOptions(options);
  } catch (error) {
    throw new PortForwardError(
      `${prefix}: cannot get credentials from the kubeconfig: ${oneLine((error as Error).message)}`,
      { cause: error },
    );
  }
  const ws = new WebSocket(url, [SUBPROTOCOL], options);
  return new Promise<Duplex>((resolve, reject) => {
    const stream = new PortForwardStream(ws, port, prefix);
    let settled = false;
    const settle = (error?: PortForwardError): void => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      ws.off('unexpected-response', onUnexpectedResponse);
      if (error) {
        stream.abandon();
        reject(error);
      } else {
        resolve(stream);
      }
    };
    // Covers the forward starting after the handshake too (the port headers).
    const timer = setTimeout(
      () => settle(new PortForwardError(`${prefix}: no answer within ${CONNECT_TIMEOUT_MS} ms`)),
      CONNECT_TIMEOUT_MS,
    );
    const onUnexpectedResponse = (_request: unknown, response: IncomingMessage): void => {
      const code = response.statusCode ?? 0;
      const chunks: Buffer[] = [];
      let size = 0;
      response.on('data', (chunk: Buffer) => {
        if (size < 64 * 1024) chunks.push(chunk);
        size += chunk.length;
      });
      const fail = (): void => {
        const body = Buffer.concat(chunks).toString('utf8');
        const reason = describeErrorBody(body) || response.statusMessage || 'no reason given';
        settle(
          new PortForwardError(`${prefix}: ${reason} (HTTP ${code})`, { statusCode: code, body }),
        );
      };
      response.once('end', fail);
      response.once('error', fail);
    };
    ws.on('unexpected-response', onUnexpectedResponse);
    stream.once('started', () => settle());
    stream.once('failed', (error: PortForwardError) => settle(error));
  });
}

/**
 * The Duplex over one WebSocket. Emits 'started' once the forward runs (the data channel's port
 * header arrived) or 'failed' if it ends before that; after 'started', failures destroy it.
 */
class PortForwardStream extends Duplex {
  readonly #ws: WebSocket;
  readonly #port: number;
  readonly #prefix: string;
  /** Port header bytes still to strip, per channel. */
  readonly #headerLeft = [PORT_HEADER_BYTES, PORT_HEADER_BYTES];
  readonly #headerBytes: number[][] = [[], []];
  #started = false;
  /** A failure is on its way to destroy(); nothing more is delivered. */
  #failing = false;
  /** The socket's error, reported when the close that follows it arrives. */
  #socketError: Error | undefined;
  /** The WebSocket's 'close' has been handled: the forward's outcome is known. */
  #closeHandled = false;
  /** A write waiting for the WebSocket's unsent bytes to fall below the high-water mark. */
  #parkedWrite: ((error?: Error | null) => void) | undefined;

  constructor(ws: WebSocket, port: number, prefix: string) {
    super({
      readableHighWaterMark: RECEIVE_HIGH_WATER_MARK,
      // Without half-close in the protocol, a forward the server ended cannot be written to.
      allowHalfOpen: false,
    });
    this.#ws = ws;
    this.#port = port;
    this.#prefix = prefix;
    ws.binaryType = 'nodebuffer';
    ws.on('open', () => {
      if (ws.protocol !== SUBPROTOCOL) {
        this.#fail(`the API server does not speak ${SUBPROTOCOL} (it chose "${ws.protocol}")`);
      }
    });
    ws.on('message', (data: Buffer, isBinary: boolean) => this.#onMessage(data, isBinary));
    ws.on('error', (error: Error) => {
      this.#socketError ??= error;
      if (!this.#started) this.emit('failed', this.#connectError(error));
    });
    ws.on('close', (code: number, reason: Buffer) => this.#onClose(code, reason.toString()));
  }

  /** Drops the WebSocket of a forward that failed to start, without emitting anything. */
  abandon(): void {
    this.#ws.removeAllListeners('message');
    this.#ws.on('error', () => {});
    this.#ws.terminate();
    this.destroy();
  }

  #connectError(error: Error & { code?: string }): PortForwardError {
    const code = error.code ?? '';
    const message = oneLine(error.message);
    const why = UNREACHABLE_CODES.has(code)
      ? `cannot reach the API server: ${message}`
      : /CERT|SELF_SIGNED|LEAF_SIGNATURE|ISSUER|ERR_TLS|ERR_SSL|HOSTNAME_MISMATCH/.test(code)
        ? `the API server's TLS certificate was rejected: ${message}`
        : message;
    return new PortForwardError(`${this.#prefix}: ${why}`, { cause: error });
  }

  #fail(reason: string): void {
    const error = new PortForwardError(`${this.#prefix}: ${oneLine(reason)}`);
    if (!this.#started) {
      this.emit('failed', error);
      return;
    }
    this.#destroyLater(error);
  }

  /**
   * Destroys the stream with `error` on the next turn of the event loop: a failure that arrives
   * together with the start (in one read of the socket) would otherwise be emitted before the
   * caller, resumed by the resolved promise, has had a chance to listen for 'error'.
   */
  #destroyLater(error: PortForwardError): void {
    if (this.#failing || this.destroyed) return;
    this.#failing = true;
    setImmediate(() => this.destroy(error));
  }

  #onMessage(data: Buffer, isBinary: boolean): void {
    if (this.destroyed || this.#failing) return;
    if (!isBinary || data.length === 0) {
      this.#fail(`the API server sent a message outside ${SUBPROTOCOL}`);
      return;
    }
    const channel = data[0] as number;
    if (channel !== DATA_CHANNEL && channel !== ERROR_CHANNEL) {
      this.#fail(`the API server sent data on channel ${channel}, which was not asked for`);
      return;
    }
    let body = data.subarray(1);
    const headerLeft = this.#headerLeft[channel] as number;
    if (headerLeft > 0) {
      const headerPart = body.subarray(0, headerLeft);
      body = body.subarray(headerPart.length);
      const header = this.#headerBytes[channel] as number[];
      header.push(...headerPart);
      this.#headerLeft[channel] = headerLeft - headerPart.length;
      if (this.#headerLeft[channel] === 0) {
        const port = (header[0] as number) | ((header[1] as number) << 8);
        if (port !== this.#port) {
          this.#fail(`the API server forwarded port ${port} instead`);
          return;
        }
        if (channel === DATA_CHANNEL && !this.#started) {
          this.#started = true;
          this.emit('started');
        }
      }
    }
    if (body.length === 0) return;
    if (channel === ERROR_CHANNEL) {
      // The server sends its error in one message and then closes: report it at once.
      this.#fail(body.toString('utf8'));
      return;
    }
    if (!this.push(body)) this.#ws.pause();
  }

  #onClose(code: number, reason: string): void {
    this.#closeHandled = true;
    if (!this.#started) {
      this.#releaseParkedWrite();
      const error = this.#socketError;
      this.emit(
        'failed',
        error
          ? this.#connectError(error)
          : new PortForwardError(
              `${this.#prefix}: the API server closed the connection before the forward started (code ${code}${reason ? `: ${oneLine(reason)}` : ''})`,
            ),
      );
      return;
    }
    // A failing forward drops its parked write in _destroy: the writer gets the failure.
    if (this.destroyed || this.#failing) return;
    if (CLEAN_CLOSE_CODES.has(code) && !this.#socketError) {
      this.#releaseParkedWrite();
      this.push(null);
      return;
    }
    const why = this.#socketError
      ? `the connection to the API server broke: ${oneLine(this.#socketError.message)}`
      : `the connection to the API server closed abnormally (code ${code}${reason ? `: ${oneLine(reason)}` : ''})`;
    this.#destroyLater(
      new PortForwardError(`${this.#prefix}: ${why}`, { cause: this.#socketError }),
    );
  }

  override _read(): void {
    this.#ws.resume();
  }

  override _write(
    chunk: Buffer,
    _encoding: BufferEncoding,
    callback: (error?: Error | null) => void,
  ): void {
    this.#send([chunk], chunk.length, callback);
  }

  override _writev(chunks: { chunk: Buffer }[], callback: (error?: Error | null) => void): void {
    let size = 0;
    for (const { chunk } of chunks) size += chunk.length;
    this.#send(
      chunks.map(({ chunk }) => chunk),
      size,
      callback,
    );
  }

  /** Sends chunks as one data-channel message; the callback waits while the sender is full. */
  #send(chunks: Buffer[], size: number, callback: (error?: Error | null) => void): void {
    if (this.#ws.readyState !== WebSocket.OPEN) {
      const closed = new PortForwardError(`${this.#prefix}: the forward is closed`);
      // A forward that is failing, or whose connection is going away, reports why on its own
      // (the server's error text, the close): the write waits for that rather than failing
      // first with less to say, and fails as before only if the forward ends cleanly. A reset
      // from the API server (a pod-side failure while the client writes) has ws close its
      // socket without an 'error' event, 'close' following.
      if (this.#failing || !this.#closeHandled) this.#parkedWrite = () => callback(closed);
      else callback(closed);
      return;
    }
    const message = Buffer.allocUnsafe(1 + size);
    message[0] = DATA_CHANNEL;
    let offset = 1;
    for (const chunk of chunks) offset += chunk.copy(message, offset);
    this.#ws.send(message, { binary: true }, (error) => {
      // A send that failed is not room for more: the close that follows decides the outcome.
      if (!error && this.#ws.bufferedAmount < SEND_HIGH_WATER_MARK) this.#releaseParkedWrite();
    });
    if (this.#ws.bufferedAmount < SEND_HIGH_WATER_MARK) callback();
    else this.#parkedWrite = callback;
  }

  #releaseParkedWrite(): void {
    const callback = this.#parkedWrite;
    this.#parkedWrite = undefined;
    callback?.();
  }

  override _final(callback: (error?: Error | null) => void): void {
    if (this.#ws.readyState === WebSocket.OPEN) this.#ws.close(1000);
    callback();
  }

  override _destroy(error: Error | null, callback: (error?: Error | null) => void): void {
    this.#parkedWrite = undefined;
    const state = this.#ws.readyState;
    if (state === WebSocket.OPEN || state === WebSocket.CONNECTING) {
      // A clean close lets the data already queued reach the pod first.
      if (error || state === WebSocket.CONNECTING) this.#ws.terminate();
      else this.#ws.close(1000);
    }
    callback(error);
  }
}
