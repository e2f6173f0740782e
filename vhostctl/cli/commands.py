"""Import every command module so each registers on the app (imports stay cheap)."""

from . import apply as apply
from . import bench as bench
from . import check as check
from . import doctor as doctor
from . import metrics as metrics
from . import selftest as selftest
from . import tap as tap
from . import up as up
from . import vm as vm
