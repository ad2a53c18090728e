"""The image's HEALTHCHECK: exit 0 when the server's readiness route answers 200, else 1.

Python is in the image anyway (the workers), so this costs nothing where curl would cost a
package. The URL is $UNIMODEL_HEALTH_URL, else http://127.0.0.1:$UNIMODEL_HEALTH_PORT (8000)
/v2/health/ready: a gateway or a node started with another --port sets the port.
"""

import os
import sys
import urllib.error
import urllib.request

port = os.environ.get("UNIMODEL_HEALTH_PORT", "8000")
url = os.environ.get("UNIMODEL_HEALTH_URL") or f"http://127.0.0.1:{port}/v2/health/ready"
try:
    with urllib.request.urlopen(url, timeout=4) as response:
        sys.exit(0 if response.status == 200 else 1)
except (urllib.error.URLError, OSError) as e:
    print(f"not ready: {url}: {e}", file=sys.stderr)
    sys.exit(1)
