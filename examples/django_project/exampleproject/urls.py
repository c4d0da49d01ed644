from django.http import HttpResponse, JsonResponse
from django.urls import path


def contacts(request):
    return JsonResponse({"tenant": request.headers.get("X-Tenant-ID"), "contacts": [{"name": "Ada"}]})


def healthz(request):
    return HttpResponse("ok")


urlpatterns = [path("contacts", contacts), path("healthz", healthz)]
