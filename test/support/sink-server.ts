/**
 * A target service for `node -e`: reads each connection to its end, then answers with the
 * number of bytes it read; prints "listening" once it does.
 */
export function sinkServer(port: number): string {
  return `
require('net').createServer((s) => {
  let n = 0;
  s.on('data', (d) => { n += d.length; });
  s.on('end', () => s.end(String(n)));
  s.on('error', () => {});
}).listen(${port}, () => console.log('listening'));`;
}
