import type { IncomingMessage, ServerResponse } from 'node:http';
import { createServer, type Server } from 'node:https';
import type { AddressInfo, Socket } from 'node:net';
import type { Duplex } from 'node:stream';
import { admitJob, validateJob } from './admission.js';
import {
  ApiError,
  badRequest,
  expired,
  forbidden,
  methodNotAllowed,
  notFound,
  unauthorized,
} from './errors.js';
import type { FaultState } from './faults.js';
import type { GarbageCollector, PropagationPolicy } from './garbage-collector.js';
import type { Kubelet } from './kubelet.js';
import { serveLogs } from './pod-logs.js';
import { PortForwarder } from './port-forward.js';
import { parseFieldSelector, parseLabelSelector, type ObjectFilter } from './selectors.js';
import type { ObjectStore } from './store.js';
import type { TlsMaterial } from './tls.js';
import {
  RESOURCES,
  apiVersionOf,
  type Job,
  type KubeObject,
  type Pod,
  type ResourceName,
  type ResourceType,
} from './types.js';
import { discovery } from './discovery.js';
import { toTable, wantsTable } from './tables.js';

/**
 * The stand-in's HTTPS front: bearer-token authentication (401), RBAC-style denials from the
 * faults (403), REST routing for the resources served (get, list, watch, create for Jobs,
 * delete), pods/log and the pods/portforward WebSocket, every failure as a `Status`. Every
 * request is recorded, so that tests can assert what a client sent.
 */

export interface RecordedRequest {
  method: string;
  /** The path without the query string. */
  path: string;
  query: Record<string, string>;
  body?: unknown;
}

export interface ApiServerOptions {
  tls: TlsMaterial;
  token: string;
  /** The user the token stands for, as RBAC messages name it. */
  user: string;
  store: ObjectStore;
  faults: FaultState;
  collector: GarbageCollector;
  kubelet: Kubelet;
  requests: RecordedRequest[];
}

interface Route {
  resource: ResourceType;
  namespace?: string;
  name?: string;
  subresource?: string;
  /** The legacy `/watch/` path form. */
  watchPath: boolean;
}

const MAX_BODY = 3 * 1024 * 1024;
const PUBLIC_PATHS = new Set(['/version', '/healthz', '/livez', '/readyz']);

const RESOURCE_BY_PATH = new Map<string, ResourceType>(
  Object.values(RESOURCES).map((r) => [`${apiVersionOf(r)}/${r.plural}`, r]),
);

/** `/api/v1/namespaces/default/pods/x/log` → pods, default, x, log. */
function parseRoute(pathname: string): Route | undefined {
  const parts = pathname.split('/').filter(Boolean).map(decodeURIComponent);
  let groupVersion: string;
  let rest: string[];
  if (parts[0] === 'api' && parts.length >= 3) {
    groupVersion = parts[1] ?? '';
    rest = parts.slice(2);
  } else if (parts[0] === 'apis' && parts.length >= 4) {
    groupVersion = `${parts[1]}/${parts[2]}`;
    rest = parts.slice(3);
  } else {
    return undefined;
  }
  const watchPath = rest[0] === 'watch';
  if (watchPath) rest = rest.slice(1);
  let namespace: string | undefined;
  if (rest[0] === 'namespaces' && rest.length >= 3) {
    namespace = rest[1];
    rest = rest.slice(2);
  }
  const [plural, name, subresource, ...extra] = rest;
  if (!plural || extra.length) return undefined;
  const resource = RESOURCE_BY_PATH.get(`${groupVersion}/${plural}`);
  if (!resource) return undefined;
  if (namespace !== undefined && !resource.namespaced) return undefined;
  return { resource, namespace, name, subresource, watchPath };
}

/** The RBAC verb(s) of a request; a denial of any of them denies it. */
function verbsOf(method: string, route: Route, watch: boolean): string[] {
  if (route.subresource === 'portforward') return ['get', 'create'];
  switch (method) {
    case 'GET':
      return [route.name ? 'get' : watch ? 'watch' : 'list'];
    case 'POST':
      return ['create'];
    case 'PUT':
      return ['update'];
    case 'PATCH':
      return ['patch'];
    case 'DELETE':
      return [route.name ? 'delete' : 'deletecollection'];
    default:
      return [method.toLowerCase()];
  }
}

function readBody(req: IncomingMessage): Promise<unknown> {
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    let size = 0;
    req.on('data', (chunk: Buffer) => {
      size += chunk.length;
      if (size > MAX_BODY) {
        reject(new ApiError(413, 'RequestEntityTooLarge', 'Request entity too large'));
        req.destroy();
        return;
      }
      chunks.push(chunk);
    });
    req.on('end', () => {
      const text = Buffer.concat(chunks).toString('utf8');
      if (!text) {
        resolve(undefined);
        return;
      }
      try {
        resolve(JSON.parse(text));
      } catch (error) {
        reject(badRequest(`error decoding the request body: ${(error as Error).message}`));
      }
    });
    req.on('error', reject);
  });
}

function sendJson(
  res: ServerResponse,
  code: number,
  body: unknown,
  headers: Record<string, string> = {},
): void {
  const text = JSON.stringify(body);
  res.writeHead(code, {
    'Content-Type': 'application/json',
    'Content-Length': Buffer.byteLength(text),
    ...headers,
  });
  res.end(text);
}

function sendError(res: ServerResponse, error: unknown): void {
  const apiError =
    error instanceof ApiError
      ? error
      : new ApiError(500, 'InternalError', `Internal error occurred: ${(error as Error).message}`);
  if (res.headersSent) {
    res.destroy();
    return;
  }
  sendJson(res, apiError.code, apiError.toStatus());
}

/** An HTTP error on a connection that asked for an upgrade, before any WebSocket exists. */
function rejectUpgrade(socket: Duplex, error: ApiError): void {
  const body = JSON.stringify(error.toStatus());
  socket.end(
    `HTTP/1.1 ${error.code} ${error.reason}\r\nContent-Type: application/json\r\nContent-Length: ${Buffer.byteLength(body)}\r\nConnection: close\r\n\r\n${body}`,
  );
}

const GO_TLS13_CIPHER_PREFERENCE = [
  'TLS_AES_128_GCM_SHA256',
  'TLS_CHACHA20_POLY1305_SHA256',
  'TLS_AES_256_GCM_SHA384',
].join(':');

export class ApiServer {
  readonly #server: Server;
  readonly #portForwarder = new PortForwarder();
  /** Ends the open watch and log streams. */
  readonly #streams = new Set<() => void>();
  readonly #sockets = new Set<Socket>();
  #url = '';

  private constructor(private readonly options: ApiServerOptions) {
    this.#server = createServer({
      key: options.tls.keyPem,
      cert: options.tls.certPem,
      // The kube-apiserver is Go: its TLS 1.3 server picks AES-128-GCM first on CPUs with AES
      // instructions, whatever order the client offers (Node offers AES-256-GCM first).
      ciphers: GO_TLS13_CIPHER_PREFERENCE,
      honorCipherOrder: true,
    });
    this.#server.on('request', (req: IncomingMessage, res: ServerResponse) => {
      this.#handle(req, res).catch((error: unknown) => sendError(res, error));
    });
    this.#server.on('upgrade', (req: IncomingMessage, socket: Duplex, head: Buffer) => {
      this.#upgrade(req, socket, head);
    });
    this.#server.on('secureConnection', (socket: Socket) => {
      this.#sockets.add(socket);
      socket.once('close', () => this.#sockets.delete(socket));
    });
  }

  static async start(options: ApiServerOptions): Promise<ApiServer> {
    const server = new ApiServer(options);
    await new Promise<void>((resolve, reject) => {
      server.#server.once('error', reject);
      server.#server.listen(0, '127.0.0.1', () => resolve());
    });
    const { port } = server.#server.address() as AddressInfo;
    server.#url = `https://127.0.0.1:${port}`;
    return server;
  }

  get url(): string {
    return this.#url;
  }

  /** Ends every stream and connection and stops listening. */
  async close(): Promise<void> {
    for (const end of [...this.#streams]) end();
    this.#portForwarder.close();
    const closed = new Promise<void>((resolve) => this.#server.close(() => resolve()));
    for (const socket of this.#sockets) socket.destroy();
    await closed;
  }

  #authenticate(req: IncomingMessage): void {
    if (req.headers.authorization !== `Bearer ${this.options.token}`) throw unauthorized();
  }

  #authorize(method: string, route: Route, watch: boolean): void {
    const resourceName = route.subresource
      ? `${route.resource.plural}/${route.subresource}`
      : route.resource.plural;
    const verbs = verbsOf(method, route, watch);
    const denied = this.options.faults.isDenied(verbs, resourceName, route.resource.group);
    if (denied) {
      throw forbidden(
        this.options.user,
        denied,
        route.resource,
        route.subresource,
        route.namespace,
        route.name,
      );
    }
  }

  #record(req: IncomingMessage, url: URL, body?: unknown): void {
    this.options.requests.push({
      method: req.method ?? 'GET',
      path: url.pathname,
      query: Object.fromEntries(url.searchParams),
      ...(body === undefined ? {} : { body }),
    });
  }

  async #handle(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const url = new URL(req.url ?? '/', 'https://stand-in');
    const method = req.method ?? 'GET';
    let body: unknown;
    try {
      body = method === 'GET' ? undefined : await readBody(req);
    } finally {
      this.#record(req, url, body);
    }
    if (PUBLIC_PATHS.has(url.pathname)) {
      if (url.pathname === '/version') sendJson(res, 200, discovery.version);
      else res.writeHead(200, { 'Content-Type': 'text/plain' }).end('ok');
      return;
    }
    this.#authenticate(req);
    const found = discovery.document(url.pathname, this.#url);
    if (found) {
      sendJson(res, 200, found);
      return;
    }
    const route = parseRoute(url.pathname);
    if (!route) {
      throw new ApiError(404, 'NotFound', 'the server could not find the requested resource');
    }
    const watch = route.watchPath || ['true', '1'].includes(url.searchParams.get('watch') ?? '');
    this.#authorize(method, route, watch);
    const { store } = this.options;
    const { resource, namespace, name, subresource } = route;

    if (subresource === 'log' && resource.plural === 'pods' && name && method === 'GET') {
      const pod = store.mustGet<Pod>('pods', namespace, name);
      const stop = serveLogs(res, pod, url.searchParams, this.options.kubelet);
      this.#streams.add(stop);
      res.once('close', () => this.#streams.delete(stop));
      return;
    }
    if (subresource === 'portforward') {
      throw badRequest('Upgrade request required');
    }
    if (subresource === 'status' && name && method === 'GET') {
      sendJson(res, 200, store.mustGet(resource.plural, namespace, name));
      return;
    }
    if (subresource) {
      throw new ApiError(404, 'NotFound', 'the server could not find the requested resource');
    }

    const table = wantsTable(req.headers.accept);
    const version = String(store.resourceVersion);
    if (method === 'GET' && name) {
      const object = store.mustGet(resource.plural, namespace, name);
      sendJson(res, 200, table ? toTable(resource.plural, [object], version) : object);
      return;
    }
    if (method === 'GET') {
      const filter = this.#filter(url.searchParams, namespace);
      if (watch) {
        this.#watch(res, resource.plural, filter, url.searchParams);
        return;
      }
      const items = store.list(resource.plural, namespace).filter(filter);
      sendJson(
        res,
        200,
        table
          ? toTable(resource.plural, items, version)
          : {
              kind: `${resource.kind}List`,
              apiVersion: apiVersionOf(resource),
              metadata: { resourceVersion: version },
              items,
            },
      );
      return;
    }
    if (method === 'POST' && !name && resource.plural === 'jobs' && namespace) {
      const job = validateJob(body, namespace);
      if (!store.get('namespaces', undefined, namespace)) {
        throw notFound(RESOURCES.namespaces, namespace);
      }
      const created = store.create<Job>('jobs', admitJob(job, namespace));
      sendJson(res, 201, created);
      return;
    }
    if (method === 'DELETE' && name) {
      const options = this.#deleteOptions(url.searchParams, body);
      const result = this.options.collector.delete(resource.plural, namespace, name, options);
      sendJson(
        res,
        200,
        result.body,
        result.warning ? { Warning: `299 - "${result.warning}"` } : {},
      );
      return;
    }
    throw methodNotAllowed();
  }

  #filter(query: URLSearchParams, namespace: string | undefined): ObjectFilter {
    const labels = parseLabelSelector(query.get('labelSelector') ?? undefined);
    const fields = parseFieldSelector(query.get('fieldSelector') ?? undefined);
    return (object) =>
      (namespace === undefined || object.metadata.namespace === namespace) &&
      labels(object) &&
      fields(object);
  }

  #deleteOptions(
    query: URLSearchParams,
    body: unknown,
  ): { propagationPolicy?: PropagationPolicy; gracePeriodSeconds?: number } {
    const fromBody = (body ?? {}) as {
      propagationPolicy?: string;
      gracePeriodSeconds?: number;
      orphanDependents?: boolean;
    };
    const policy = query.get('propagationPolicy') ?? fromBody.propagationPolicy;
    const orphan = query.get('orphanDependents') ?? fromBody.orphanDependents;
    const grace = query.get('gracePeriodSeconds') ?? fromBody.gracePeriodSeconds;
    let propagationPolicy: PropagationPolicy | undefined;
    if (policy !== undefined && policy !== null) {
      if (policy !== 'Background' && policy !== 'Foreground' && policy !== 'Orphan') {
        throw badRequest(
          `DeleteOptions.meta.k8s.io "" is invalid: propagationPolicy: Unsupported value: "${policy}": supported values: "Foreground", "Background", "Orphan", "nil"`,
        );
      }
      propagationPolicy = policy;
    } else if (orphan !== undefined && orphan !== null) {
      propagationPolicy = String(orphan) === 'true' ? 'Orphan' : 'Background';
    }
    const gracePeriodSeconds =
      grace === undefined || grace === null || grace === '' ? undefined : Number(grace);
    if (
      gracePeriodSeconds !== undefined &&
      (!Number.isInteger(gracePeriodSeconds) || gracePeriodSeconds < 0)
    ) {
      throw badRequest(`invalid gracePeriodSeconds: ${String(grace)}`);
    }
    return {
      ...(propagationPolicy ? { propagationPolicy } : {}),
      ...(gracePeriodSeconds === undefined ? {} : { gracePeriodSeconds }),
    };
  }

  /**
   * A watch stream: the current objects as ADDED (no resourceVersion) or the changes since
   * resourceVersion (410 Expired when too old), then every change, one JSON event per line.
   * An object that stops matching the selectors leaves the watch with DELETED, one that starts
   * matching joins with ADDED.
   */
  #watch(
    res: ServerResponse,
    resource: ResourceName,
    filter: ObjectFilter,
    query: URLSearchParams,
  ): void {
    const { store } = this.options;
    const from = query.get('resourceVersion');
    res.writeHead(200, { 'Content-Type': 'application/json' });
    // As the real API server: the client learns at once that the watch is established.
    res.flushHeaders();
    const send = (type: string, object: unknown): void => {
      res.write(`${JSON.stringify({ type, object })}\n`);
    };
    const visible = new Set<string>();
    const keyOf = (o: KubeObject): string => `${o.metadata.namespace ?? ''}/${o.metadata.name}`;
    const deliver = (type: string, object: KubeObject): void => {
      const key = keyOf(object);
      const matches = filter(object);
      if (type === 'DELETED') {
        if (visible.delete(key) || matches) send('DELETED', object);
      } else if (matches) {
        send(visible.has(key) ? type : 'ADDED', object);
        visible.add(key);
      } else if (visible.delete(key)) {
        send('DELETED', object);
      }
    };
    let last = store.resourceVersion;
    if (!from || from === '0') {
      for (const object of store.list(resource)) deliver('ADDED', object);
    } else {
      const events = store.eventsSince(Number(from));
      if (!events || Number.isNaN(Number(from))) {
        send(
          'ERROR',
          expired(`too old resource version: ${from} (${store.resourceVersion})`).toStatus(),
        );
        res.end();
        return;
      }
      for (const object of store.list(resource)) {
        if (filter(object)) visible.add(keyOf(object));
      }
      for (const event of events) {
        if (event.resource === resource) deliver(event.type, event.object);
      }
    }
    const unsubscribe = store.subscribe((event) => {
      if (event.resourceVersion <= last) return;
      last = event.resourceVersion;
      if (event.resource === resource) deliver(event.type, event.object);
    });
    const timeoutSeconds = Number(query.get('timeoutSeconds') ?? 0);
    const timer = timeoutSeconds > 0 ? setTimeout(() => end(), timeoutSeconds * 1000) : undefined;
    const end = (): void => {
      unsubscribe();
      clearTimeout(timer);
      this.#streams.delete(end);
      res.end();
    };
    this.#streams.add(end);
    res.once('close', end);
  }

  #upgrade(req: IncomingMessage, socket: Duplex, head: Buffer): void {
    const url = new URL(req.url ?? '/', 'https://stand-in');
    this.#record(req, url);
    try {
      this.#authenticate(req);
      const route = parseRoute(url.pathname);
      if (
        !route ||
        route.subresource !== 'portforward' ||
        route.resource.plural !== 'pods' ||
        !route.name
      ) {
        throw badRequest('the server does not support upgrades for this request');
      }
      this.#authorize(req.method ?? 'GET', route, false);
      const pod = this.options.store.mustGet<Pod>('pods', route.namespace, route.name);
      if (!pod.spec.nodeName) throw badRequest(`pod ${route.name} does not have a host assigned`);
      const sandbox = this.options.kubelet.sandboxOf(pod.metadata.uid ?? '');
      if (!sandbox || pod.status.phase !== 'Running') {
        throw badRequest(
          `unable to upgrade connection: pod is not running - current status=${pod.status.phase}`,
        );
      }
      const ports = url.searchParams
        .getAll('ports')
        .flatMap((value) => value.split(','))
        .filter(Boolean)
        .map(Number);
      if (ports.length === 0)
        throw badRequest('unable to upgrade connection: "ports" query parameter is required');
      for (const port of ports) {
        if (!Number.isInteger(port) || port < 1 || port > 65535) {
          throw badRequest(`unable to upgrade connection: invalid port "${port}"`);
        }
      }
      if (!PortForwarder.acceptsProtocols(req)) {
        throw badRequest(
          `unable to upgrade connection: requested protocol(s) are not supported: ${req.headers['sec-websocket-protocol']}; supports [v4.channel.k8s.io]`,
        );
      }
      this.#portForwarder.handleUpgrade(req, socket, head, {
        podName: route.name,
        uid: pod.metadata.uid ?? '',
        netns: sandbox.netns,
        ports,
      });
    } catch (error) {
      rejectUpgrade(
        socket,
        error instanceof ApiError
          ? error
          : new ApiError(500, 'InternalError', (error as Error).message),
      );
    }
  }
}
