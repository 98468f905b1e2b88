"""`k3batch report OUTPUT`: the run's static HTML page and contact sheet (`page.write_report`),
from its metadata files (`scan`), with the sheet drawn in `contact_sheet`."""
