import type { ServerResponse } from 'node:http';
import type { LogLine } from './container-log.js';
import { badRequest } from './errors.js';
import type { Kubelet } from './kubelet.js';
import type { Pod } from './types.js';

/**
 * `GET …/pods/NAME/log`: a container's output, with the real query parameters (container,
 * follow, previous, tailLines, sinceSeconds, sinceTime, timestamps, limitBytes) and the real
 * 400 messages for a pod whose container has not started. With follow the response stays open
 * and gets each new line until the container ends.
 */

function nanoTimestamp(time: Date): string {
  return time.toISOString().replace(/\.(\d{3})Z$/, '.$1000000Z');
}

function positiveInteger(query: URLSearchParams, name: string): number | undefined {
  const raw = query.get(name);
  if (raw === null || raw === '') return undefined;
  const value = Number(raw);
  if (!Number.isInteger(value) || value < 0) {
    throw badRequest(`invalid value for ${name}: "${raw}": must be a non-negative integer`);
  }
  return value;
}

function waitingMessage(reason: string): string {
  return reason === 'ErrImagePull' || reason === 'ImagePullBackOff'
    ? 'trying and failing to pull image'
    : reason;
}

/**
 * Answers the log request; throws an ApiError (before anything is written) when the log cannot
 * be served. Returns a function that ends a follow stream early (server shutdown).
 */
export function serveLogs(
  res: ServerResponse,
  pod: Pod,
  query: URLSearchParams,
  kubelet: Kubelet,
): () => void {
  const podName = pod.metadata.name ?? '';
  const names = pod.spec.containers.map((c) => c.name);
  const container = query.get('container') || (names.length === 1 ? names[0] : undefined);
  if (!container) {
    throw badRequest(
      `a container name must be specified for pod ${podName}, choose one of: [${names.join(' ')}]`,
    );
  }
  if (!names.includes(container)) {
    throw badRequest(`container ${container} is not valid for pod ${podName}`);
  }
  if (!pod.spec.nodeName) throw badRequest(`pod ${podName} does not have a host assigned`);
  const logs = kubelet.containerLogs(pod.metadata.uid ?? '', container);
  const previous = query.get('previous') === 'true';
  const instances = logs?.instances ?? [];
  if (previous && instances.length < 2) {
    throw badRequest(`previous terminated container "${container}" in pod "${podName}" not found`);
  }
  const instance = previous ? instances.at(-2) : instances.at(-1);
  if (!instance) {
    const reason = logs?.waiting?.reason ?? 'ContainerCreating';
    throw badRequest(
      `container "${container}" in pod "${podName}" is waiting to start: ${waitingMessage(reason)}`,
    );
  }

  const follow = query.get('follow') === 'true' && !previous;
  const timestamps = query.get('timestamps') === 'true';
  const tailLines = positiveInteger(query, 'tailLines');
  const limitBytes = positiveInteger(query, 'limitBytes');
  const sinceSeconds = positiveInteger(query, 'sinceSeconds');
  const sinceTime = query.get('sinceTime');
  const since =
    sinceSeconds !== undefined
      ? Date.now() - sinceSeconds * 1000
      : sinceTime
        ? Date.parse(sinceTime)
        : undefined;

  let lines = instance.log.lines.filter((l) => since === undefined || l.time.getTime() >= since);
  if (tailLines !== undefined) lines = tailLines === 0 ? [] : lines.slice(-tailLines);

  res.writeHead(200, { 'Content-Type': 'text/plain' });
  res.flushHeaders();
  let written = 0;
  let ended = false;
  const write = (line: LogLine): void => {
    if (ended) return;
    let bytes = timestamps
      ? Buffer.concat([Buffer.from(`${nanoTimestamp(line.time)} `), line.bytes])
      : line.bytes;
    if (limitBytes !== undefined && written + bytes.length >= limitBytes) {
      bytes = bytes.subarray(0, limitBytes - written);
      res.write(bytes);
      stop();
      return;
    }
    written += bytes.length;
    res.write(bytes);
  };
  const stop = (): void => {
    if (ended) return;
    ended = true;
    instance.log.off('line', write);
    instance.log.off('end', stop);
    res.end();
  };
  for (const line of lines) write(line);
  if (!follow || instance.log.ended) {
    stop();
    return stop;
  }
  instance.log.on('line', write);
  instance.log.once('end', stop);
  res.once('close', stop);
  return stop;
}
