"""The README's picture of the web demo: serve a converted folder, ask about an image in headless Chromium, save
the page as a PNG. It drives the page with the browser test's own helpers (tests/tools/test_web_demo.py).

Usage::

    make demo                                      # its closing lines name the converted folder
    .venv/bin/python docs/screenshot_web_demo.py work_dirs/demo/converted \\
        --image work_dirs/demo/data/images/test_00000.png \\
        --prompt "Is the triangle on the left or the right?" "What colour is the triangle?" --out docs/web_demo.png
"""

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests.tools.test_web_demo import ask_in_page, chromium, open_page, serve  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('folder')
    parser.add_argument('--image', required=True, help='the image, sent with the first question')
    parser.add_argument('--prompt', nargs='+', required=True, help='the questions, asked in one conversation')
    parser.add_argument('--out', default='docs/web_demo.png')
    args = parser.parse_args(argv)
    with serve(args.folder, '--max-new-tokens', '16') as url:
        driver = chromium(1280, 1000)
        try:
            open_page(driver, url)
            for i, prompt in enumerate(args.prompt):
                print(f'{prompt} -> {ask_in_page(driver, prompt, os.path.abspath(args.image) if i == 0 else None)}')
            driver.execute_script('window.scrollTo(0, 0)')
            driver.save_screenshot(args.out)
        finally:
            driver.quit()
    print(f'wrote {args.out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
